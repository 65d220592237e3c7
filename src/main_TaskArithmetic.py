"""Task Arithmetic: θ = θ0 + λ Σ τ_t (METHODS.md §2.2)."""
from taskmerge.runs.cli import main
from taskmerge.runs.data_free import run_data_free
from taskmerge.runs.methods import TaskArithmeticConfig

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
scaling_coef = 0.3            # λ (EnnengYang's fixed prior)
select_on_val = False         # True: choose λ on the <Task>Val splits (tall_masks/TSV protocol)
val_grid = "tall_masks"       # "tall_masks" (0.1…1.0) | "tsv" (1/30…1.0) | "tsv_alpha" (0.1…3.0)
# DARE before the merge (FusionBench's defaults: p 0.5, rescale; for DARE+TIES it uses λ 0.5)
dare_p = 0.0                  # drop probability of each task-vector entry; 0: no DARE
dare_rescale = True           # kept entries ×1/(1 − p), as DARE is published
dare_seed = 0                 # masks seeded by (seed, task, key): reproducible, unlike FusionBench's

if __name__ == "__main__":
    main(run_data_free, TaskArithmeticConfig, globals())
