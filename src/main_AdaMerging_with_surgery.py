"""AdaMerging + Representation Surgery v1, or SurgeryV2 with `surgery = "v2"` (METHODS.md §2.8, §2.9).

The base is task- or layer-wise AdaMerging(++); every other base: src/main_Surgery.py."""
from taskmerge.runs.adaptive import run_surgery
from taskmerge.runs.cli import main
from taskmerge.runs.methods import AdaMergingSurgeryConfig

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
# the base: tw_adamerging | lw_adamerging | tw_adamergingpp | lw_adamergingpp
method_name = "lw_adamerging"
# its coefficients
coefficients = "auto"         # "published" | "learn" | a saved .json | "auto": published, saved, learn
prior = 0.3                   # initial λ, in [0, 1]
clamp = True                  # λ kept in [0, 1] as the originals; False: unclamped, as FusionBench
adamerging_steps = 500
adamerging_lr = 1e-3
adamerging_eval_every = 500   # evaluate every N steps (and at the start and the end)
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
    main(run_surgery, AdaMergingSurgeryConfig, globals())
