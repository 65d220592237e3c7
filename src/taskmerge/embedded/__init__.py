"""Layer 5, the embedded offline benchmark: its tasks and the packaged sources they are read from,
the tiny CLIP's pretraining, the experts' fine-tuning, and the build. May import every layer below."""
