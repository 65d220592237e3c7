"""Layer 2, models: open_clip image encoders, the tokenizers of the text towers, zero-shot heads.
May import storage and datasets."""
