"""The results tables from the runs' JSON reports: one Markdown table per model (method with its
hyperparameters and Surgery variant, per task, average, normalized average), the Surgery-on-each-base
table, and the same rows as CSV.

    python src/summarize_results.py --log_dir=src/logs --model=taskmerge-tiny

Where several reports carry the same label, the newest is kept (and the replaced ones are listed);
a file that is not a valid report is skipped with a warning naming it.
"""
from taskmerge.runs.cli import main
from taskmerge.runs.preparation import run_summary
from taskmerge.runs.script_configs import SummaryConfig

# where the reports are (every *.json under it, recursively)
log_dir = "src/logs"
# filters: one value or a comma-separated list; empty keeps all
model = ""                    # e.g. "taskmerge-tiny", "ViT-B-32"
family = ""                   # checkpoint family: "embedded", "task_vectors", "tall_masks", "safetensors"
method = ""                   # the report's method; a Surgery run's is its base (e.g. "task_arithmetic")
# output
csv_path = "src/logs/results.csv"   # the rows as CSV ("" to skip)

if __name__ == "__main__":
    main(run_summary, SummaryConfig, globals())
