"""Convert task_vectors / tall_masks checkpoints to safetensors, once (METHODS.md §4.1, §4.2).

    python src/convert_checkpoints.py --model_name=ViT-B-16

Reads the pickled modules with taskmerge's restricted unpickler (no code from the files runs) and
writes <checkpoint_dir>/<model_name>/safetensors/{zeroshot,<Task>,head_<Task>}.safetensors, which
every script then prefers: they load key by key and need neither open_clip 2.0.2 nor pickle.
Already converted files are skipped, so it is safe to run again.
"""
from taskmerge.runs.cli import main
from taskmerge.runs.preparation import run_convert_checkpoints
from taskmerge.runs.script_configs import ConvertCheckpointsConfig

# where the checkpoints are
checkpoint_dir = "checkpoints"
model_name = "ViT-B-32"
tasks = ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
family = "auto"   # task_vectors | tall_masks | auto (task_vectors first)
out_dir = None    # default: <checkpoint_dir>/<model_name>/safetensors

if __name__ == "__main__":
    main(run_convert_checkpoints, ConvertCheckpointsConfig, globals())
