"""Layer 6, runs: what entry scripts call. Setup (model, checkpoints, data), evaluation, reporting,
coefficient selection on validation, the data-free and adaptive runs, `--key=value` configuration."""
