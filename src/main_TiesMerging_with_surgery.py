"""TiesMerging + Representation Surgery (v1), or SurgeryV2 with `surgery = "v2"` (METHODS.md §2.8, §2.9)."""
from taskmerge.runs.adaptive import run_surgery
from taskmerge.runs.config import configure

# model and data ("auto": ViT-B-32 if its checkpoints exist, else the embedded offline benchmark)
model_name = "auto"
checkpoint_dir = "checkpoints"
data_location = "data"
tasks = []                    # empty: every task of the model's benchmark, in its order
# output
log_dir = "src/logs"
save_dir = ""                 # the base merge as safetensors ("" to skip)
resume_dir = "checkpoints/resume"   # training state every checkpoint_every steps ("" to disable)
batch_size = 128              # evaluation batch
seed = 0
# base merging method: weight_averaging | task_arithmetic | ties_merging | tw_adamerging |
# lw_adamerging | tw_adamergingpp | lw_adamergingpp | emr_merging | tsv_merging | consensus
method_name = "ties_merging"
preset = "ennengyang"         # K 20 %, dis-sum, λ 0.3
# AdaMerging coefficients (for tw_/lw_adamerging(pp) bases)
coefficients = "auto"         # "published" | "learn" | a saved .json; "auto": published, else saved, else learn
prior = 0.3
adamerging_steps = 500
# surgery (RepresentationSurgery defaults; SurgeryV2: surgery = "v2")
surgery = "v1"                # "v1": module on the final feature; "v2": after every block as well
rank = 16                     # SurgeryV2 paper's parameter-matched v1: 304 (B) / 132 (L/14)
iterations = 500              # × tasks × 2 Adam steps (batch 16)
eval_iterations = 100
lr = 1e-3
zero_grad_mode = "zero"       # "zero": torch 1.x semantics (the published runs); "none": torch 2.x
checkpoint_every = 100
online = False

if __name__ == "__main__":
    run_surgery(configure(globals()), script=__file__)
