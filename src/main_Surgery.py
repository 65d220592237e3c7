"""Representation Surgery v1, or SurgeryV2 with `surgery = "v2"`, on any declared base (METHODS.md §2.8, §2.9).

`method_name` picks the base: weight_averaging | task_arithmetic | ties_merging | tw_adamerging |
lw_adamerging | tw_adamergingpp | lw_adamergingpp | emr_merging | tsv_merging | consensus | iso_c |
iso_cts | wudi_merging | cart_merging | pcb_merging | traditional_mtl, or a base of a method of your own
(docs/ADDING_A_METHOD.md). The base's settings are the variables of its own script (e.g.
src/main_IsoMerging.py for iso_c / iso_cts), each overridable here with --key=value; the run's first
log line prints all of them.
"""
from taskmerge.runs.adaptive import run_surgery
from taskmerge.runs.cli import main_on_any_base

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
method_name = "iso_cts"       # the base (its settings: its own script's variables, --key=value here)
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
    main_on_any_base(run_surgery, globals())
