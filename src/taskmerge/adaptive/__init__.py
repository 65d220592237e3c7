"""Layer 4, adaptive (data-dependent training): the functional merge, AdaMerging and its coefficient
tables, Surgery v1 / online / v2, feature caches, the representation bias, resumable training state.
May import storage, datasets, models and merging."""
