"""WeightAveraging + Representation Surgery v1, or SurgeryV2 with `surgery = "v2"` (METHODS.md §2.8, §2.9)."""
from taskmerge.runs.adaptive import run_surgery
from taskmerge.runs.cli import main
from taskmerge.runs.script_configs import SurgeryRunConfig

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
# base merging method: weight_averaging | task_arithmetic | ties_merging | tw_adamerging |
# lw_adamerging | tw_adamergingpp | lw_adamergingpp | emr_merging | tsv_merging | consensus |
# iso_c | iso_cts | wudi_merging | cart_merging | pcb_merging (DARE: task_arithmetic / ties_merging, dare_p > 0)
method_name = "weight_averaging"
# the base's settings: each base reads only its own (the data-free scripts describe them)
drop_last = False             # weight_averaging: True drops the last task vector (the original bug)
scaling_coef = None           # task_arithmetic / ties_merging λ (None: 0.3 for TA, the preset's for TIES)
preset = "ennengyang"         # ties_merging: "ennengyang" (K 20 %, dis-sum, λ 0.3) | "tall_masks"
k = None                      # ties_merging kept fraction in (0, 1]; None: the preset's
merge = None                  # ties_merging "dis-sum" | "dis-mean" | "dis-max"; None: the preset's
rescaler = "code"             # emr_merging: "code" (per-tensor means) | "paper" (whole-vector sums)
alpha = 1.0                   # tsv_merging / consensus / iso_c / iso_cts: α when not chosen on val
select_on_val = False         # task_arithmetic / tsv_merging / consensus / iso_*: choose λ or α on <Task>Val
val_grid = None               # its grid; None: the base's own ("tsv_alpha" for TSV, else "tall_masks")
use_ties = False              # consensus: τ_MTL = TIES(K 20 %, dis-sum) instead of Σ τ
tall_lambdas = [0.2, 0.3, 0.4, 0.5, 0.6]   # consensus: each task's TALL λ, chosen on its <Task>Val
prun_thre_k = 2               # consensus: keep weights selected by at least k tasks
merge_device = "cpu"          # tsv_merging / iso_c / iso_cts: where the SVDs run ("cpu" | "auto" | "cuda[:i]")
dare_p = 0.0                  # task_arithmetic / ties_merging: DARE's drop probability first (0: no DARE)
dare_rescale = True           # task_arithmetic / ties_merging: DARE's ×1/(1 − p) on the kept entries
dare_seed = 0                 # task_arithmetic / ties_merging: DARE masks seeded by (seed, task, key)
common_space_fraction = 0.8   # iso_cts: the common subspace's share of each key's rank
wudi_preset = "original"      # wudi_merging: "original" (block matrices, 300 steps) | "fusionbench"
wudi_solver = "adam"          # wudi_merging: "adam" (the original) | "closed_form" (X* = B·A⁺)
wudi_steps = None             # wudi_merging: Adam steps; None: the preset's
wudi_lr = 1e-5                # wudi_merging: Adam's learning rate
wudi_ridge = 0.0              # wudi_merging closed_form: ridge ε = ridge·tr(A)/in (0: pseudo-inverse)
cart_preset = None            # cart_merging: the repo's config for 8 | 14 | 20 tasks; None: the nearest
cart_lambda = None            # cart_merging: λ; None: the preset's
cart_rank_ratio = None        # cart_merging: ρ; None: the preset's
pcb_ratio = 0.05              # pcb_merging: the top fraction r of balancing scores kept
pcb_lambda = 1.2              # pcb_merging: λ_t of every task unless searched
pcb_search = False            # pcb_merging: pcb_ES.py's λ_t search on <Task>Val instead (seeded (1+1)-ES)
pcb_search_lower = 0.8        # pcb_merging: the search box and start, as pcb_ES.py
pcb_search_upper = 1.3
pcb_search_init = 1.0
pcb_search_budget = 100       # pcb_merging: merges evaluated on <Task>Val (pcb_ES.py: 100)
pcb_search_seed = 0
qkv = "auto"                  # emr / tsv / iso / wudi: attention "fused" | "separate" q/k/v; "auto":
                              # separate on the fusionbench family (and WUDI's fusionbench preset)
# AdaMerging coefficients (for tw_/lw_adamerging(pp) bases)
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
    main(run_surgery, SurgeryRunConfig, globals())
