#!/usr/bin/env bash
# Re-run every script and setting whose row is in README's embedded-benchmark tables, then print the
# tables from the runs' JSON reports (src/summarize_results.py) into <log_dir>/tables.md and
# <log_dir>/results.csv.
#
#   bash scripts/reproduce_embedded_tables.sh [log_dir]       # default: src/logs/embedded_tables
#   DRY_RUN=1 bash scripts/reproduce_embedded_tables.sh       # print the commands, run nothing
#   ONLY='^(ta|surgery_v2_ta)$' bash scripts/reproduce_embedded_tables.sh   # only the runs so named
#
# As the README's rows were logged: at most two runs at a time; each script runs the embedded
# benchmark on one thread and restarts itself on the pinned CPU code paths (cpu_paths="auto"), so the
# numbers are the same on every x86-64 machine. About 2 h on 2 cores once the benchmark is built. Every training run starts from scratch (resume_dir=""), and the Surgery runs on
# AdaMerging bases learn their coefficients again (same seed, so the same coefficients), so no run
# depends on another's leftovers and the order does not matter.
# Environment: MODEL (taskmerge-tiny), CHECKPOINT_DIR (checkpoints), DATA_LOCATION (data), JOBS (2),
# ONLY (an extended regular expression on the run names below; empty: every run).
set -euo pipefail
cd "$(dirname "$0")/.."

LOG_DIR="${1:-src/logs/embedded_tables}"
MODEL="${MODEL:-taskmerge-tiny}"
CHECKPOINT_DIR="${CHECKPOINT_DIR:-checkpoints}"
DATA_LOCATION="${DATA_LOCATION:-data}"
JOBS="${JOBS:-2}"
DRY_RUN="${DRY_RUN:-0}"
ONLY="${ONLY:-}"
COMMON="--model_name=$MODEL --checkpoint_dir=$CHECKPOINT_DIR --data_location=$DATA_LOCATION --log_dir=$LOG_DIR"
TRAINING="--resume_dir="
MICRO=False
[[ "$MODEL" == *-micro ]] && MICRO=True

RUNS=()   # "name|script and its overrides" (COMMON is added to each)
add() { if [[ -z "$ONLY" ]] || grep -Eq -- "$ONLY" <<< "$1"; then RUNS+=("$1|$2"); fi; }

# Results table: reference rows, data-free merges, AdaMerging (learned, 500 steps), per-task models.
add zeroshot_individual "src/eval_single_task.py"
add wa                  "src/main_WeightAveraging.py"
add ta                  "src/main_TaskArithmetic.py"                       # λ 0.3
add ta_val              "src/main_TaskArithmetic.py --select_on_val=True"  # λ on val (tall_masks grid)
add ties_ennengyang     "src/main_TiesMerging.py --preset=ennengyang"      # dis-sum, K 0.2, λ 0.3
add ties_tall_masks     "src/main_TiesMerging.py --preset=tall_masks"      # dis-mean, K 0.2, λ on val
add tsvm_val            "src/main_TSVMerging.py --method=TSVM --select_on_val=True"
add tsvm2_val           "src/main_TSVMerging.py --method=TSVM_2 --select_on_val=True"
add consensus_val       "src/main_TallMasks.py --method=consensus --prun_thre_k=2 --select_on_val=True"
for m in tw_adamerging lw_adamerging tw_adamergingpp lw_adamergingpp; do
  add "$m"              "src/main_AdaMerging.py --method_name=$m --coefficients=learn --adamerging_steps=500 $TRAINING"
done
# The 2025 data-free records, and DARE / PCB (METHODS_RECORDS.md): the originals' defaults.
add iso_c_val           "src/main_IsoMerging.py --method=iso_c"             # α on val, early stopping
add iso_cts_val         "src/main_IsoMerging.py --method=iso_cts"           # f 0.8, α on val
add wudi_adam           "src/main_WUDIMerging.py"                           # block matrices, Adam 300 steps
add wudi_closed_form    "src/main_WUDIMerging.py --wudi_solver=closed_form" # X* = B·A⁺
add cart                "src/main_CARTMerging.py"                           # the 8-task preset: λ 2.0, ρ 0.12
add pcb                 "src/main_PCBMerging.py"                            # r 0.05, λ 1.2
add dare_ta             "src/main_TaskArithmetic.py --dare_p=0.5"           # FusionBench's DARE+TA: λ 0.3
add dare_ties           "src/main_TiesMerging.py --dare_p=0.5 --scaling_coef=0.5"   # its DARE+TIES: λ 0.5
add emr                 "src/main_EMRMerging.py"
add tall_mask           "src/main_TallMasks.py --method=tall_mask"
add tsvc                "src/main_TSVMerging.py --method=TSVC"
# The data-aware rows of the seeds' table (FusionBench's defaults: 256 training images per task), and
# Traditional MTL (the experts' fine-tuning recipe on the mixture of the five training sets).
add traditional_mtl     "src/main_TraditionalMTL.py $TRAINING"
add fisher              "src/main_FisherMerging.py"
add regmean             "src/main_RegMean.py"                               # ratio 0.95
add regmean_plusplus    "src/main_RegMean.py --method=regmean_plusplus"

# Surgery table: v1 and SurgeryV2 on each base. TA, TIES, WA and AdaMerging have Surgery scripts of
# their own (TA λ 0.3, TIES dis-sum λ 0.3); every other base runs through main_Surgery.py with its
# own script's defaults, except where a row fixes the coefficient instead of searching it on val
# (TSV-M α 1.0, Consensus k 2 α 1.0); Iso-C / Iso-CTS choose α on val, as the original does;
# DARE+TA / DARE+TIES: FusionBench's p 0.5, λ 0.3 / 0.5.
for v in v1 v2; do
  add "surgery_${v}_ta"        "src/main_TaskArithmetic_with_surgery.py --surgery=$v --scaling_coef=0.3 $TRAINING"
  add "surgery_${v}_lw"        "src/main_AdaMerging_with_surgery.py --surgery=$v --method_name=lw_adamerging --coefficients=learn $TRAINING"
  add "surgery_${v}_wa"        "src/main_WeightAveraging_with_surgery.py --surgery=$v $TRAINING"
  add "surgery_${v}_ties"      "src/main_TiesMerging_with_surgery.py --surgery=$v --preset=ennengyang $TRAINING"
  add "surgery_${v}_tw"        "src/main_AdaMerging_with_surgery.py --surgery=$v --method_name=tw_adamerging --coefficients=learn $TRAINING"
  add "surgery_${v}_emr"       "src/main_Surgery.py --surgery=$v --method_name=emr_merging $TRAINING"
  add "surgery_${v}_tsvm"      "src/main_Surgery.py --surgery=$v --method_name=tsv_merging --select_on_val=False $TRAINING"
  add "surgery_${v}_consensus" "src/main_Surgery.py --surgery=$v --method_name=consensus --select_on_val=False $TRAINING"
  add "surgery_${v}_iso_c"     "src/main_Surgery.py --surgery=$v --method_name=iso_c --select_on_val=True $TRAINING"
  add "surgery_${v}_iso_cts"   "src/main_Surgery.py --surgery=$v --method_name=iso_cts --select_on_val=True $TRAINING"
  add "surgery_${v}_wudi_adam" "src/main_Surgery.py --surgery=$v --method_name=wudi_merging $TRAINING"
  add "surgery_${v}_wudi_closed_form" "src/main_Surgery.py --surgery=$v --method_name=wudi_merging --wudi_solver=closed_form $TRAINING"
  add "surgery_${v}_cart"      "src/main_Surgery.py --surgery=$v --method_name=cart_merging $TRAINING"
  add "surgery_${v}_pcb"       "src/main_Surgery.py --surgery=$v --method_name=pcb_merging $TRAINING"
  add "surgery_${v}_dare_ta"   "src/main_TaskArithmetic_with_surgery.py --surgery=$v --scaling_coef=0.3 --dare_p=0.5 $TRAINING"
  add "surgery_${v}_dare_ties" "src/main_TiesMerging_with_surgery.py --surgery=$v --preset=ennengyang --dare_p=0.5 --scaling_coef=0.5 $TRAINING"
  add "surgery_${v}_mtl"       "src/main_Surgery.py --surgery=$v --method_name=traditional_mtl $TRAINING"
  add "surgery_${v}_fisher"    "src/main_Surgery.py --surgery=$v --method_name=fisher_merging $TRAINING"
  add "surgery_${v}_regmean"   "src/main_Surgery.py --surgery=$v --method_name=regmean $TRAINING"
  add "surgery_${v}_regmean_plusplus" "src/main_Surgery.py --surgery=$v --method_name=regmean_plusplus $TRAINING"
done
# Online Surgery (batch 1, each test image once) on layer-wise AdaMerging.
add surgery_online_lw "src/main_AdaMerging_with_surgery_online.py --method_name=lw_adamerging --coefficients=learn $TRAINING"

BUILD="python3 src/build_embedded_benchmark.py --checkpoint_dir=$CHECKPOINT_DIR --data_location=$DATA_LOCATION --micro=$MICRO"
SUMMARY="python3 src/summarize_results.py --log_dir=$LOG_DIR --model=$MODEL --csv_path=$LOG_DIR/results.csv"

if [[ "$DRY_RUN" == 1 ]]; then
  echo "$BUILD"
  for run in "${RUNS[@]}"; do
    echo "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python3 ${run#*|} $COMMON"
  done
  echo "$SUMMARY > $LOG_DIR/tables.md"
  exit 0
fi

# The benchmark first, alone (it sets its own threads): two runs must not both build it.
$BUILD
mkdir -p "$LOG_DIR/console"
rm -f "$LOG_DIR"/console/*.rc   # a previous reproduction's exit codes
echo "${#RUNS[@]} runs, $JOBS at a time; console output in $LOG_DIR/console/"
i=0
for run in "${RUNS[@]}"; do
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done
  i=$((i + 1))
  name="$(printf '%02d' "$i")_${run%%|*}"
  cmd="python3 ${run#*|} $COMMON"
  echo "[start] $name: $cmd"
  (
    rc=0
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $cmd > "$LOG_DIR/console/$name.txt" 2>&1 || rc=$?
    echo "$rc" > "$LOG_DIR/console/$name.rc"
    echo "[done rc=$rc] $name"
  ) &
done
wait

failed=()
for rc_file in "$LOG_DIR"/console/*.rc; do
  [[ "$(cat "$rc_file")" == 0 ]] || failed+=("$(basename "$rc_file" .rc)")
done
summary_rc=0
$SUMMARY | tee "$LOG_DIR/tables.md" || summary_rc=$?
if (( ${#failed[@]} )); then
  echo "FAILED runs (see $LOG_DIR/console/<name>.txt): ${failed[*]}" >&2
  exit 1
fi
exit "$summary_rc"
