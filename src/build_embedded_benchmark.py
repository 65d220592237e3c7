"""Build (or reuse) the embedded offline benchmark: tiny CLIP, zero-shot heads, one expert per task.

    python src/build_embedded_benchmark.py                 # checkpoints/taskmerge-tiny (≈ 10 min, 2 cores)
    python src/build_embedded_benchmark.py --micro=True    # checkpoints/taskmerge-tiny-micro (seconds)

Every method script builds it on first use anyway; this script only does it up front and prints the
calibration table (zero-shot, experts, Task Arithmetic at λ = 0.3). The recipe lives in
`taskmerge.embedded.build.RECIPE`; a build is reused until the recipe or the data change.
"""
from taskmerge.runs.cli import main
from taskmerge.runs.preparation import run_build_benchmark
from taskmerge.runs.script_configs import BuildBenchmarkConfig

# where things are
checkpoint_dir = "checkpoints"  # the model folder is <checkpoint_dir>/taskmerge-tiny[-micro]
data_location = "data"          # the embedded tasks are cached under <data_location>/embedded[-micro]
# what to build
micro = False                   # the test suite's micro benchmark instead of the full one
progress = True                 # progress bars

if __name__ == "__main__":
    main(run_build_benchmark, BuildBenchmarkConfig, globals())
