"""CART: weight averaging plus λ times the low-rank centred task vectors (METHODS_RECORDS.md §4)."""
from taskmerge.runs.cli import main
from taskmerge.runs.data_free import run_data_free
from taskmerge.runs.methods import CARTMergingConfig

# model and data ("auto": ViT-B-32 if its checkpoints exist, else the embedded offline benchmark)
model_name = "auto"
checkpoint_dir = "checkpoints"
data_location = "data"
data_format = "folders"       # "folders" (originals' layouts) | "parquet" (HF snapshots); embedded ignores it
trust_label_order = False     # True: data whose class names match none of ours is taken to be in our order
tasks = []                    # empty: every task of the model's benchmark, in its order
# output
log_dir = "src/logs"
cache_dir = "auto"            # built heads, expert accuracies, features: "auto" = the model folder (a user cache if read-only)
save_dir = "checkpoints/merged"   # merged model as safetensors ("" to skip)
batch_size = 128              # evaluation batch
# machine (README "GPUs and torchrun")
device = "auto"               # "auto": "cuda" when torch sees a GPU, else "cpu"; or "cpu", "cuda:1", ...
tf32 = False                  # TF32 matmuls on CUDA (off: fp32, as the originals' math; README says what it does)
num_workers = "auto"          # DataLoader workers: "auto" = 0 on CPU, min(8, cores - 1) per GPU process
threads = "auto"              # torch CPU threads: "auto" = 1 for the embedded model, else the cores (README)
cpu_paths = "auto"            # "auto": "pinned" for the embedded model on CPU (same bits on any x86-64; README)
rendezvous_timeout = 300      # torchrun: seconds each rank waits for the others to start
# method
cart_preset = None            # the repository's config for 8 | 14 | 20 tasks; None: the one nearest the run's
cart_lambda = None            # λ (`prior`); None: the preset's (2.0 / 1.5 / 1.9)
cart_rank_ratio = None        # ρ (`initial_rank_ratio`): rank max(1, ⌊ρ·min(m, n)⌋); None: the preset's

if __name__ == "__main__":
    main(run_data_free, CARTMergingConfig, globals())
