"""RegMean and RegMean++: every linear map the least-squares fit of the experts' maps on their own
inputs (Jin et al. 2023); RegMean++ takes each block's inputs through the blocks already merged
(Nguyen et al. 2025). FusionBench's clip_regmean.yaml / clip_regmean_plusplus.yaml defaults."""
from taskmerge.runs.cli import main
from taskmerge.runs.data_free import run_data_free
from taskmerge.runs.methods import RegMeanConfig

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
# method (FusionBench's clip_regmean.yaml and clip_regmean_plusplus.yaml defaults)
method = "regmean"            # "regmean" | "regmean_plusplus"
num_regmean_examples = 256    # training images per task (a seeded sample of its train split)
regmean_batch_size = 32
reduce_non_diagonal_ratio = 0.95  # Gram off-diagonals ×0.95 (1: plain Gram; 0: diagonal only)
regmean_ridge = 0.0           # ridge·I added to Σ Gram before solving (0: none; the ratio already guards)
plusplus_post = "pretrained"  # RegMean++'s ln_post and projection: "pretrained" (θ0, as the original) | "merged"
sample_seed = 0               # which training images: torch.randperm(|train|, seed)[:n]

if __name__ == "__main__":
    main(run_data_free, RegMeanConfig, globals())
