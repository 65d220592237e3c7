"""Zero-shot and individual fine-tuned accuracy per task: the two reference rows of every table; with
`model_file`, also a saved model's (a merge's or Traditional MTL's save_dir file) on every task."""
from taskmerge.runs.cli import main
from taskmerge.runs.data_free import run_single_task_eval
from taskmerge.runs.script_configs import SingleTaskEvalConfig

# model and data ("auto": ViT-B-32 if its checkpoints exist, else the embedded offline benchmark)
model_name = "auto"
checkpoint_dir = "checkpoints"
data_location = "data"
data_format = "folders"       # "folders" (originals' layouts) | "parquet" (HF snapshots); embedded ignores it
trust_label_order = False     # True: data whose class names match none of ours is taken to be in our order
tasks = []                    # empty: every task of the model's benchmark
# evaluation
split = "test"                # "test", or "val" for the <Task>Val held-out splits
batch_size = 128
model_file = ""               # a saved model (.safetensors from save_dir) to evaluate too; "": none
# machine (README "GPUs and torchrun")
device = "auto"               # "auto": "cuda" when torch sees a GPU, else "cpu"; or "cpu", "cuda:1", ...
tf32 = False                  # TF32 matmuls on CUDA (off: fp32, as the originals' math; README says what it does)
num_workers = "auto"          # DataLoader workers: "auto" = 0 on CPU, min(8, cores - 1) per GPU process
threads = "auto"              # torch CPU threads: "auto" = 1 for the embedded model, else the cores (README)
cpu_paths = "auto"            # "auto": "pinned" for the embedded model on CPU (same bits on any x86-64; README)
rendezvous_timeout = 300      # torchrun: seconds each rank waits for the others to start
log_dir = "src/logs"
cache_dir = "auto"            # built heads, expert accuracies, features: "auto" = the model folder (a user cache if read-only)

if __name__ == "__main__":
    main(run_single_task_eval, SingleTaskEvalConfig, globals())
