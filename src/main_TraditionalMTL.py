"""Traditional MTL: one encoder fine-tuned jointly on every task's training split, each example's loss
through its own task's frozen zero-shot head (the seeds' tables' reference row; METHODS.md §6.1).

FusionBench's multi-task clip_finetune loop (fusion_bench/method/classification/clip_finetune.py):
every step one batch per task, the tasks' mean cross-entropies summed, one Adam step. The trained
encoder is cached (a second run, or src/main_Surgery.py --method_name=traditional_mtl, loads it);
src/eval_single_task.py --model_file=<the saved .safetensors> evaluates it like an expert.
Under torchrun each rank trains its shard of every task's batch (DistributedDataParallel).
"""
from taskmerge.runs.cli import main
from taskmerge.runs.data_free import run_data_free
from taskmerge.runs.methods import TraditionalMTLConfig

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
save_dir = "checkpoints/merged"   # the trained encoder as safetensors, like a merge ("" to skip; it is cached anyway)
resume_dir = "checkpoints/resume"   # training state every checkpoint_every steps ("" to disable)
batch_size = 128              # evaluation batch
# machine (README "GPUs and torchrun")
device = "auto"               # "auto": "cuda" when torch sees a GPU, else "cpu"; or "cpu", "cuda:1", ...
tf32 = False                  # TF32 matmuls on CUDA (off: fp32, as the originals' math; README says what it does)
num_workers = "auto"          # DataLoader workers: "auto" = 0 on CPU, min(8, cores - 1) per GPU process
threads = "auto"              # torch CPU threads: "auto" = 1 for the embedded model, else the cores (README)
cpu_paths = "auto"            # "auto": "pinned" for the embedded model on CPU (same bits on any x86-64; README)
rendezvous_timeout = 300      # torchrun: seconds each rank waits for the others to start
# method
mtl_recipe = "auto"           # "fusionbench" | "experts" | "auto": the experts' recipe (their manifest's
                              # "finetune": AdamW, warm-up + cosine, clip 1.0, crops) on the embedded
                              # benchmark, FusionBench's elsewhere (Adam, cosine, no warm-up/clip/crops)
mtl_steps = "auto"            # "auto": the recipe's (FusionBench 4000; embedded experts 400)
mtl_batch_size = "auto"       # images per task per step; "auto": the recipe's (FusionBench 128; experts 64)
mtl_lr = "auto"               # "auto": the recipe's (FusionBench 1e-5; experts 5e-4)
mtl_weight_decay = "auto"     # "auto": the recipe's (FusionBench 0; experts 0.1)
seed = 0                      # draws the batches and crops (FusionBench's clip_finetune.yaml seeds 42)
checkpoint_every = 100        # resume state every N steps

if __name__ == "__main__":
    main(run_data_free, TraditionalMTLConfig, globals())
