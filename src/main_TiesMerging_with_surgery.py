"""TiesMerging + Representation Surgery v1, or SurgeryV2 with `surgery = "v2"` (METHODS.md §2.8, §2.9).

The base is TIES (DARE first with dare_p > 0); every other base: src/main_Surgery.py."""
from taskmerge.runs.adaptive import run_surgery
from taskmerge.runs.cli import main
from taskmerge.runs.methods import TiesMergingSurgeryConfig

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
save_dir = ""                 # the base merge as safetensors ("" to skip)
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
# the base: TIES-Merging (main_TiesMerging.py describes its settings)
method_name = "ties_merging"
preset = "ennengyang"         # "ennengyang" (K 20 %, dis-sum, λ 0.3) or "tall_masks" (dis-mean, λ on val)
k = None                      # kept fraction in (0, 1]; None: the preset's
merge = None                  # "dis-sum" | "dis-mean" | "dis-max"; None: the preset's
scaling_coef = None           # λ; None: the preset's (chosen on val for "tall_masks")
val_grid = "tall_masks"       # the λ grid when λ is chosen on val ("tall_masks" | "tsv" | "tsv_alpha")
# DARE before the merge (FusionBench's defaults: p 0.5, rescale; for DARE+TIES it uses λ 0.5)
dare_p = 0.0                  # drop probability of each task-vector entry; 0: no DARE
dare_rescale = True           # kept entries ×1/(1 − p), as DARE is published
dare_seed = 0                 # masks seeded by (seed, task, key): reproducible, unlike FusionBench's
# surgery (RepresentationSurgery defaults; SurgeryV2: surgery = "v2")
surgery = "v1"                # "v1": module on the final feature; "v2": after every block as well
rank = "auto"                 # "auto": 16 (v1; v2 on B/32, B/16) or 4 (v2 on ViT-L/14), the originals'
                              # SurgeryV2 paper's parameter-matched v1: 304 (B) / 132 (L/14)
iterations = 500              # × tasks × 2 Adam steps (batch 16)
eval_iterations = 100         # evaluate every N iterations
lr = 1e-3
zero_grad_mode = "zero"       # "zero": torch 1.x semantics (the published runs); "none": torch 2.x
checkpoint_every = 100        # resume state every N iterations (online: samples) and AdaMerging steps
online = False                # True: batch 1, each test image seen once (v1 only)
feature_cache = ""            # the experts' cached features ("": <model folder>/feature_cache)


if __name__ == "__main__":
    main(run_surgery, TiesMergingSurgeryConfig, globals())
