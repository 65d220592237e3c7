"""taskmerge: multi-task model merging of CLIP ViT image encoders, with Representation Surgery.

One folder per layer, lowest first; a module may import from its own layer and the ones before it,
never from a later one (tests/test_layers.py reads every import to check it)."""
__version__ = "0.1.0"

LAYERS = ("storage", "compute", "datasets", "models", "merging", "adaptive", "embedded", "runs")
