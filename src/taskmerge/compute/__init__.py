"""Where the numbers are computed: the device a run uses, and the ranks of a torchrun launch."""
