"""taskmerge: multi-task model merging of CLIP ViT image encoders, with Representation Surgery."""
__version__ = "0.1.0"
