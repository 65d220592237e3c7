"""Task Singular Vectors: TSV-M (TSVM, TSVM_2) and TSV-C (METHODS.md §2.11, §2.12)."""
from taskmerge.runs.cli import main
from taskmerge.runs.data_free import run_data_free
from taskmerge.runs.methods import TSVMergingConfig

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
method = "TSVM"               # "TSVM" | "TSVM_2" | "TSVC"
alpha = 1.0                   # α when not chosen on val (TSV-C always uses 1.0)
select_on_val = True          # the original picks α from {0.1, …, 3.0} on the <Task>Val splits
merge_device = "cpu"          # where the SVDs run: "cpu" (streaming, peak < 2 GiB) | "auto" | "cuda[:i]"
val_grid = "tsv_alpha"        # the α grid when chosen on val ("tsv_alpha" | "tall_masks" | "tsv")
qkv = "auto"                  # TSVM/TSVM_2 attention "fused" (one in_proj, the original) | "separate" (q, k, v,
                              # as FusionBench's TSVM); "auto": separate on the fusionbench family; TSVC: fused

if __name__ == "__main__":
    main(run_data_free, TSVMergingConfig, globals())
