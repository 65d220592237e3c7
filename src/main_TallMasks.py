"""TALL masks (task localization) and Consensus merging (METHODS.md §2.13, §2.14)."""
from taskmerge.runs.cli import main
from taskmerge.runs.data_free import run_data_free
from taskmerge.runs.methods import TallMasksConfig

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
method = "consensus"          # "tall_mask" (per-task models) | "consensus" (one merged model)
use_ties = False              # τ_MTL = TIES(K 20 %, dis-sum) instead of Σ τ
tall_lambdas = [0.2, 0.3, 0.4, 0.5, 0.6]   # each task's λ is chosen on its <Task>Val split
prun_thre_k = 2               # consensus: keep weights selected by at least k tasks (1 ≤ k ≤ T)
alpha = 1.0                   # consensus α when not chosen on val
select_on_val = True          # consensus: choose α on the <Task>Val splits
val_grid = "tall_masks"       # the α grid ("tall_masks" | "tsv" | "tsv_alpha")
load_mask = False             # read the masks released with the tall_masks checkpoints (TALL_mask_<N>task.npy)

if __name__ == "__main__":
    main(run_data_free, TallMasksConfig, globals())
