"""Weight Averaging: θ = θ0 + (1/T) Σ τ_t (METHODS.md §2.1)."""
from taskmerge.runs.cli import main
from taskmerge.runs.data_free import run_data_free
from taskmerge.runs.script_configs import WeightAveragingConfig

# model and data ("auto": ViT-B-32 if its checkpoints exist, else the embedded offline benchmark)
model_name = "auto"
checkpoint_dir = "checkpoints"
data_location = "data"
data_format = "folders"       # "folders" (originals' layouts) | "parquet" (HF snapshots); embedded ignores it
tasks = []                    # empty: every task of the model's benchmark, in its order
# output
log_dir = "src/logs"
save_dir = "checkpoints/merged"   # merged model as safetensors ("" to skip)
batch_size = 128              # evaluation batch
# method
drop_last = False             # True reproduces the original bug that drops the last task vector

if __name__ == "__main__":
    main(run_data_free, WeightAveragingConfig, globals())
