"""AdaMerging: learn task-wise or layer-wise merging coefficients by entropy minimisation on
unlabelled test images (METHODS.md §2.4–2.7); ++ uses TIES-selected task vectors."""
from taskmerge.runs.adaptive import run_adamerging
from taskmerge.runs.cli import main
from taskmerge.runs.script_configs import AdaMergingRunConfig

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
save_dir = ""                 # the merged model as safetensors ("" to skip)
resume_dir = "checkpoints/resume"   # training state every checkpoint_every steps ("" to disable)
batch_size = 128              # evaluation batch
# machine (README "GPUs and torchrun")
device = "auto"               # "auto": "cuda" when torch sees a GPU, else "cpu"; or "cpu", "cuda:1", ...
tf32 = False                  # TF32 matmuls on CUDA (off: fp32, as the originals' math; README says what it does)
num_workers = "auto"          # DataLoader workers: "auto" = 0 on CPU, min(8, cores - 1) per GPU process
threads = "auto"              # torch CPU threads: "auto" = 1 for the embedded model, else the cores (README)
cpu_paths = "auto"            # "auto": "pinned" for the embedded model on CPU (same bits on any x86-64; README)
rendezvous_timeout = 300      # torchrun: seconds each rank waits for the others to start
seed = 0
# method
method_name = "lw_adamerging"   # tw_adamerging | lw_adamerging | tw_adamergingpp | lw_adamergingpp
coefficients = "learn"          # "learn" | "published" | a saved .json | "auto"
prior = 0.3                     # initial λ, in [0, 1]
clamp = True                    # λ kept in [0, 1] as the originals; False: unclamped, as FusionBench
adamerging_steps = 500
adamerging_lr = 1e-3
adamerging_eval_every = 500     # evaluate every N steps (and at the start and the end)
checkpoint_every = 50           # resume state every N steps

if __name__ == "__main__":
    main(run_adamerging, AdaMergingRunConfig, globals())
