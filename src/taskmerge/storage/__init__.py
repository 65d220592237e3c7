"""Layer 0, storage: atomic writes, the restricted unpickler, checkpoint layouts and lazy readers,
and the allocator hint. Imports nothing from taskmerge."""
