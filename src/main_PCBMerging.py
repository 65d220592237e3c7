"""PCB-Merging: parameter competition balancing, pcb_ES.py's variant (METHODS_RECORDS.md §6)."""
from taskmerge.runs.cli import main
from taskmerge.runs.data_free import run_data_free
from taskmerge.runs.methods import PCBMergingConfig

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
pcb_ratio = 0.05              # r: the top fraction of each task's balancing scores that keeps a weight
pcb_lambda = 1.2              # λ_t of every task unless searched (pcb.py's fixed value; with pcb_ES's
                              # balancing this pair is neither original's run)
# pcb_ES.py's own λ search: one λ_t per task on <Task>Val, mean absolute ACC. The original runs
# nevergrad's NGOpt (unseeded); here a seeded (1+1)-ES with the one-fifth rule (runs/selection.py)
pcb_search = False            # True: search λ_t instead of pcb_lambda
pcb_search_lower = 0.8        # the search box, as pcb_ES.py
pcb_search_upper = 1.3
pcb_search_init = 1.0         # every λ_t starts here, as pcb_ES.py
pcb_search_budget = 100       # merges evaluated on <Task>Val, the start included (pcb_ES.py: 100)
pcb_search_seed = 0

if __name__ == "__main__":
    main(run_data_free, PCBMergingConfig, globals())
