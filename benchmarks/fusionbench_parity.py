"""FusionBench parity: FusionBench's own algorithm classes and our entry scripts on the same files.

  bash benchmarks/fusionbench_env.sh                         # once: FusionBench in .venv-fusionbench/
  python3 benchmarks/fusionbench_parity.py                   # tiny model, every method (minutes on a CPU)
  python3 benchmarks/fusionbench_parity.py --methods=TA,TIES --size=b32

Writes a fixture (benchmarks/fusionbench_fixtures.py: random-weight HF CLIP checkpoints in FusionBench's
hub layout and parquet test sets), runs FusionBench's side in its own environment
(benchmarks/_fusionbench_side.py: the project never imports fusion_bench) and ours as a user runs it
(`src/main_X.py --model_name=ViT-B-32 --data_format=parquet ...`), then prints one table:

- per method, the worst per-key relative L2 ‖θ_ours − θ_FB‖ / ‖θ_FB − θ0‖ over the merged vision
  weights, in FusionBench's keys (q, k, v apart; benchmarks/fusionbench_keys.py), and its target;
  EMR: the worst over the task-specific models. SVD methods are also measured against FusionBench's
  class run on float64 models, and FusionBench's float32 against that reference; RegMean and
  RegMean++ too, judged by ours with float64 statistics (benchmarks/_taskmerge_float64.py) against
  it. Fisher, RegMean and RegMean++ take every image of the fixture's train split (≤ 32 per task,
  one batch on both sides).
- a "Heads" row: per task, the largest difference between the unit-norm zero-shot class embeddings
  of both sides (ours: `head_<Task>.pt` divided by its row norms; FusionBench: HFCLIPClassifier's
  zeroshot_weights), or the class counts where they differ.
- per task, the accuracy of both sides ("ours / FB") on the same images.

The table goes to stdout and to `<work>/<size>/parity.md` (default work: benchmarks/.cache/).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "src"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fusionbench_keys import hf_vision_key, ours_to_hf, relative_l2  # noqa: E402
from taskmerge.storage.hf_checkpoints import (FUSIONBENCH_TASK_NAMES, load_hf_image_encoder,  # noqa: E402
                                              read_hf_checkpoint)

PAPER_8 = ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
TASKS = list(PAPER_8)  # --tasks replaces it
TIGHT, SVD = 1e-4, 1e-4
# The two text towers (transformers' and open_clip's) round differently: "identical" heads are
# unit class embeddings within float32 rounding of each other.
HEADS = 1e-5
QKV = ("q_proj", "k_proj", "v_proj")

# method: (our script, its settings matching FusionBench's yaml, target, kind)
# kind "exact": same math, target TIGHT; "svd" / "float64": target SVD against the float64 reference
# (FusionBench's class run on float64 models).
OURS = {
    "WA": ("main_WeightAveraging.py", [], "exact"),
    "TA": ("main_TaskArithmetic.py", ["--scaling_coef=0.3", "--select_on_val=False"], "exact"),
    "TIES": ("main_TiesMerging.py", ["--preset=ennengyang", "--k=0.2", "--merge=dis-sum",
                                     "--scaling_coef=0.3"], "exact"),
    # FusionBench's DareSimpleAverage is its DARE+TA with λ = 1/T (method/dare/simple_average.py)
    "DARE-WA": ("main_TaskArithmetic.py", ["--scaling_coef={inv_t}", "--select_on_val=False",
                                           "--dare_p=0.5", "--dare_rescale=True", "--dare_seed=0"], "exact"),
    "DARE-TA": ("main_TaskArithmetic.py", ["--scaling_coef=0.3", "--select_on_val=False",
                                           "--dare_p=0.5", "--dare_rescale=True", "--dare_seed=0"], "exact"),
    "DARE-TIES": ("main_TiesMerging.py", ["--preset=ennengyang", "--k=0.2", "--merge=dis-sum",
                                          "--scaling_coef=0.5", "--dare_p=0.5", "--dare_rescale=True",
                                          "--dare_seed=0"], "exact"),
    "TSV-M": ("main_TSVMerging.py", ["--method=TSVM", "--alpha=1.0", "--select_on_val=False"], "svd"),
    "EMR": ("main_EMRMerging.py", ["--rescaler=code"], "exact"),
    "Iso-C": ("main_IsoMerging.py", ["--method=iso_c", "--alpha=1.0", "--select_on_val=False"], "svd"),
    "Iso-CTS": ("main_IsoMerging.py", ["--method=iso_cts", "--alpha=1.0", "--common_space_fraction=0.8",
                                       "--select_on_val=False"], "svd"),
    # Adam on each 2-D key: the same steps from the same start, so float32 rounding is all that differs
    "WUDI": ("main_WUDIMerging.py", ["--wudi_preset=fusionbench"], "exact"),
    # The data-aware ones on each task's n ≤ 32 training images, in one batch of 32 on both sides:
    # FusionBench's Fisher (the first n, in order), its RegMean (shuffled, unseeded) and ours (a
    # seeded permutation) then sum over the same examples, and the Fisher's squared batch gradient
    # is of the same batch. FusionBench inverts Σ G̃ with float32 torch.inverse, ours solves in
    # float64: RegMean is measured against FusionBench's class run on float64 models, as the SVDs.
    "Fisher": ("main_FisherMerging.py", ["--num_fisher_examples={n}", "--fisher_batch_size=32"], "exact"),
    "RegMean": ("main_RegMean.py", ["--method=regmean", "--num_regmean_examples={n}",
                                    "--regmean_batch_size=32"], "float64"),
    "RegMean++": ("main_RegMean.py", ["--method=regmean_plusplus", "--num_regmean_examples={n}",
                                      "--regmean_batch_size=32"], "float64"),
}
DATA_METHODS = ("Fisher", "RegMean", "RegMean++")
DATA_BATCH = 32
# FusionBench methods with no row of numbers here, and why.
NOT_COMPARED = {
    "AdaMerging": "not compared yet: not the same run: FusionBench (method/adamerging, clip.yaml) takes "
                  "one batch of 16 per task per step from an unseeded infinite shuffle, 1000 steps, "
                  "unclamped λ, one λ per parameter tensor (q, k, v apart); ours (EnnengYang's "
                  "protocol) two batches of a fresh seeded shuffle, 500 steps, clamped λ, one λ per "
                  "in_proj. A comparison needs FusionBench's batches injected and a FusionBench mode "
                  "on our side",
    "Surgery (on AdaMerging)": "not compared yet: its base is AdaMerging's (above)",
    "Traditional MTL": "not compared: a training run of thousands of steps (FusionBench's clip_finetune), "
                       "not a merge of given experts; its loop is tested against one process, a resume "
                       "and the loss's fall (tests/test_traditional_mtl.py)",
}


def log(msg: str) -> None:
    print(f"[parity] {msg}", flush=True)


class SideFailed(Exception):
    """A side's command exited non-zero; the message is the last line it printed."""


def run(cmd: list[str], log_file: str) -> None:
    """Run a side's command; its output goes to `log_file`, whose last line a failure names."""
    with open(log_file, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode:
        with open(log_file) as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
        raise SideFailed(f"exit {proc.returncode}: {lines[-1] if lines else 'no output'} (log {log_file})")


# ---------------------------------------------------------------- the two sides
def fusionbench_side(args, fixture: str, out: str, methods: list[str]) -> None:
    tasks = json.dumps({t: FUSIONBENCH_TASK_NAMES[t] for t in TASKS})
    cmd = [args.fb_python, os.path.join(HERE, "_fusionbench_side.py"), "run", "--root", fixture,
           "--tasks-json", tasks, "--methods", ",".join(methods), "--out", out,
           "--batch-size", str(args.batch_size), "--train-examples", str(args.train_images_per_task)]
    log(f"FusionBench side: {', '.join(methods)} (log {out}.log)")
    run(cmd, out + ".log")


def our_side(args, fixture: str, out: str, method: str) -> dict:
    """Run our script for `method`; (merged file, report) from its save_dir and log_dir."""
    script, settings, _ = OURS[method]
    settings = [s.format(inv_t=1 / len(TASKS), n=args.train_images_per_task) for s in settings]
    folder = os.path.join(out, method)
    cmd = [sys.executable, os.path.join(HERE, "_taskmerge_side.py")]
    if args.size == "tiny":
        cmd += ["--open-clip-config", os.path.join(fixture, "open_clip_config.json")]
    cmd += [os.path.join(REPO, "src", script), "--model_name=ViT-B-32",
            f"--checkpoint_dir={os.path.join(fixture, 'checkpoints')}",
            f"--data_location={os.path.join(fixture, 'data')}", "--data_format=parquet",
            f"--tasks={TASKS!r}", f"--save_dir={os.path.join(folder, 'merged')}",
            f"--log_dir={os.path.join(folder, 'logs')}", "--device=cpu",
            f"--batch_size={args.batch_size}", *settings]
    log(f"our side: {method}: {script} {' '.join(settings)}")
    run(cmd, folder + ".log")
    merged = glob.glob(os.path.join(folder, "merged", "ViT-B-32", "*.safetensors"))
    reports = glob.glob(os.path.join(folder, "logs", "**", "*.json"), recursive=True)
    if len(merged) != 1 or len(reports) != 1:
        raise SystemExit(f"{method}: expected one merged file and one report under {folder}, found "
                         f"{merged} and {reports}")
    with open(reports[0]) as f:
        return {"merged": merged[0], "report": json.load(f)}


def our_float64(args, fixture: str, out: str, method: str) -> str:
    """Our RegMean / RegMean++ with float64 statistics (benchmarks/_taskmerge_float64.py); its file."""
    path = os.path.join(out, method, "statistics_float64.safetensors")
    cmd = [sys.executable, os.path.join(HERE, "_taskmerge_float64.py"), "--fixture", fixture,
           "--tasks", ",".join(TASKS), "--method", method, "--out", path]
    if args.size == "tiny":
        cmd += ["--open-clip-config", os.path.join(fixture, "open_clip_config.json")]
    log(f"our side: {method} with float64 statistics")
    run(cmd, os.path.join(out, f"{method}.float64.log"))
    return path


# ---------------------------------------------------------------- comparing
def fb_state(path: str) -> dict[str, torch.Tensor]:
    return {hf_vision_key(k): v for k, v in load_file(path).items()}


def our_states(method: str, merged: str, fixture: str) -> dict[str, dict[str, torch.Tensor]]:
    """{task or "": our merged vision tensors in FusionBench's keys}."""
    base = os.path.join(fixture, "checkpoints", "openai", "clip-vit-base-patch32")
    config = read_hf_checkpoint(base).config
    if method == "EMR":
        from taskmerge.merging.emr import EMRMerged
        theta0, _ = load_hf_image_encoder(base)
        emr = EMRMerged.load(merged)
        return {t: ours_to_hf(emr.task_state_dict(theta0, t), config) for t in TASKS}
    return {"": ours_to_hf(load_file(merged), config)}


def compare_weights(method: str, kind: str, ours: dict, fb_dir: str, theta0: dict) -> dict:
    rows = {}
    for task, state in ours.items():
        suffix = f"__{task}" if task else ""
        rows[task] = relative_l2(state, fb_state(os.path.join(fb_dir, f"{method}{suffix}.safetensors")),
                                 theta0)
    for r in rows.values():  # where a q/k/v merge differs, is the rest the same?
        rest = [v for k, v in r["per_key"].items() if k.split(".")[-2] not in QKV]
        r["worst_outside_qkv"] = max(rest, default=0.0)
    worst_task = max(rows, key=lambda t: rows[t]["worst"])
    out = {"fb32": rows[worst_task], "task": worst_task}
    ref = os.path.join(fb_dir, f"{method}.f64.safetensors")
    if kind in ("svd", "float64") and os.path.exists(ref):
        reference = fb_state(ref)
        out["f64"] = relative_l2(ours[""], reference, theta0)
        out["fb32_vs_f64"] = relative_l2(fb_state(os.path.join(fb_dir, f"{method}.safetensors")),
                                         reference, theta0)
    return out


def compare_heads(fixture: str, fb_dir: str) -> dict[str, str]:
    from taskmerge.storage.checkpoints import load_head
    theirs = load_file(os.path.join(fb_dir, "heads.safetensors"))
    cells = {}
    for task in TASKS:
        path = os.path.join(fixture, "checkpoints", "ViT-B-32", f"head_{task}.pt")
        if not os.path.exists(path):
            cells[task] = "no head"
            continue
        weight = load_head(path)["weight"].to(torch.float64)
        fb = theirs[task].to(torch.float64)
        if weight.shape != fb.shape:
            cells[task] = f"{weight.shape[0]} vs {fb.shape[0]} classes"
            continue
        diff = float((weight / weight.norm(dim=1, keepdim=True) - fb).abs().max())
        cells[task] = f"{diff:.1e}"
    return cells


def compare_pixels(args, fixture: str, fb_dir: str) -> dict[str, str]:
    """Per task, the largest difference between the images our scripts evaluate (runs.setup.task_data,
    the transform the run picks for this family) and FusionBench's CLIPDataset, and how many differ."""
    from taskmerge.runs.setup import resolve_setup, task_data
    from taskmerge.storage.errors import InputError
    if args.size == "tiny":
        from _taskmerge_side import register_as_vit_b_32
        register_as_vit_b_32(os.path.join(fixture, "open_clip_config.json"))
    theirs = load_file(os.path.join(fb_dir, "pixels.safetensors"))
    setup = resolve_setup("ViT-B-32", os.path.join(fixture, "checkpoints"), os.path.join(fixture, "data"),
                          list(TASKS), "parquet")
    cells = {}
    for task in TASKS:
        try:
            data = task_data(setup, task).test
        except InputError as e:  # our reader refuses this data: the cell says so
            cells[task] = f"ours refused: {str(e)[:80]}…"
            continue
        ours = torch.stack([data[i][0] for i in range(len(data))])
        if ours.shape != theirs[task].shape:
            cells[task] = f"shape {tuple(ours.shape[1:])} vs {tuple(theirs[task].shape[1:])}"
            continue
        diff = (ours - theirs[task]).abs().flatten(1).amax(1)
        cells[task] = f"{float(diff.max()):.1e} ({int((diff > 1e-5).sum())}/{len(diff)})"
    return cells


def fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1e}"


def table(results: dict, heads: dict, fb_acc: dict, our_individual: dict | None, meta: dict,
          pixels: dict | None = None) -> str:
    head = ["Method", "worst rel. L2 (key)", "target", "ok"] + TASKS
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if pixels:
        ok_pixels = all(" (0/" in c for c in pixels.values())
        lines.append("| Pixels (max \\|Δ\\| of preprocessed images; images > 1e-5 apart) | | ≤ 1e-05 | "
                     f"{'yes' if ok_pixels else 'NO'} | " + " | ".join(pixels[t] for t in TASKS) + " |")
    ok_heads = all(c != "no head" and "classes" not in c and float(c) <= HEADS for c in heads.values())
    lines.append(f"| Heads (max \\|Δ\\| of unit class embeddings) | | ≤ {HEADS:g} | "
                 f"{'yes' if ok_heads else 'NO'} | " + " | ".join(heads[t] for t in TASKS) + " |")

    def accs(ours: dict | None, theirs: dict | None) -> tuple[list[str], bool]:
        cells, same = [], True
        for t in TASKS:
            a = ours.get(t) if ours else None
            b = theirs.get(t) if theirs else None
            if a is None or b is None:
                cells.append("–")
                continue
            same &= abs(a - b) < 1e-9
            cells.append(f"{100 * a:.1f} / {100 * b:.1f}" + ("" if abs(a - b) < 1e-9 else " ≠"))
        return cells, same

    cells, same = accs(our_individual, fb_acc.get("Individual"))
    lines.append(f"| Individual (acc. ours / FB) | | equal acc. | {'yes' if same else 'NO'} | "
                 + " | ".join(cells) + " |")
    for method, r in results.items():
        if "error" in r:
            lines.append(f"| {method} | our script failed: {r['error']} | | NO | "
                         + " | ".join("–" for _ in TASKS) + " |")
            continue
        w = r["weights"]
        detail = f"{fmt(w['fb32']['worst'])} ({w['fb32']['worst_key']}{', ' + w['task'] if w['task'] else ''})"
        if w["fb32"]["worst_key"] and w["fb32"]["worst_key"].split(".")[-2] in QKV:
            detail += f"; outside q/k/v: {fmt(w['fb32']['worst_outside_qkv'])}"
        if "ours64" in w:  # RegMean: the algorithms compared with float64 statistics on both sides
            passed = w["ours64"]["worst"] <= SVD
            detail += (f"; vs FB float64: {fmt(w['f64']['worst'])}; ours with float64 statistics vs FB "
                       f"float64: {fmt(w['ours64']['worst'])} ({w['ours64']['worst_key']}); FB float32 vs "
                       f"float64: {fmt(w['fb32_vs_f64']['worst'])}")
            target = f"≤ {SVD:g}, float64 statistics on both sides"
        elif "f64" in w:
            passed = w["f64"]["worst"] <= SVD
            detail += (f"; vs FB float64: {fmt(w['f64']['worst'])}; FB float32 vs float64: "
                       f"{fmt(w['fb32_vs_f64']['worst'])}")
            target = f"≤ {SVD:g} vs float64"
        else:
            passed = w["fb32"]["worst"] <= TIGHT
            target = f"≤ {TIGHT:g}"
        cells, same = accs(r["accuracy"], fb_acc.get(method))
        lines.append(f"| {method} | {detail} | {target} | {'yes' if passed and same else 'NO'} | "
                     + " | ".join(cells) + " |")
    for method, why in NOT_COMPARED.items():
        lines.append(f"| {method} | {why} | | – | " + " | ".join("" for _ in TASKS) + " |")
    notes = (f"\n{meta['date']}; fixture {meta['size']} ({meta['images']} test images per task"
             + (f", {meta['train_images']} training images per task (Fisher, RegMean, RegMean++: all of them, "
                f"one batch of {DATA_BATCH} on both sides)" if meta.get("train_images") else "")
             + ", random "
             f"weights and images, {meta['labels']} labels); fusion-bench {meta['versions'].get('fusion-bench')} with transformers "
             f"{meta['versions'].get('transformers')} (its venv), torch {meta['versions'].get('torch')}; "
             f"taskmerge at {meta['commit']} with transformers {meta['our_transformers']}. "
             "ok: the weights within the target and every accuracy equal. DARE: FusionBench's class "
             "with taskmerge's seeded masks injected. Accuracy cells: ours / FusionBench in %.")
    return "\n".join(lines) + "\n" + notes + "\n"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(OURS),
                        help=f"comma-separated subset of {', '.join(OURS)}")
    parser.add_argument("--tasks", default=",".join(PAPER_8),
                        help="comma-separated tasks (any with a FusionBench expert and parquet reader, "
                             "e.g. KMNIST,FER2013,Flowers102,OxfordIIITPet)")
    parser.add_argument("--size", choices=["tiny", "b32"], default="tiny")
    parser.add_argument("--images-per-task", type=int, default=64)
    parser.add_argument("--train-images-per-task", type=int, default=DATA_BATCH,
                        help=f"the train split per task, all of which Fisher, RegMean and RegMean++ use "
                             f"(1..{DATA_BATCH}: one batch on both sides)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--work", default=os.path.join(HERE, ".cache", "fusionbench_parity"))
    parser.add_argument("--fb-python", default=os.path.join(REPO, ".venv-fusionbench", "bin", "python"))
    parser.add_argument("--labels", choices=["expert", "random"], default="expert",
                        help="expert: each test image labelled with its expert's prediction under "
                             "FusionBench's pipeline (accuracies then measure agreement with the "
                             "experts); random: uniform labels")
    parser.add_argument("--reuse-fixture", action="store_true",
                        help="keep an existing fixture of the same size (and its cached heads)")
    args = parser.parse_args()
    TASKS[:] = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in OURS]
    if unknown:
        raise SystemExit(f"--methods: {unknown} are not compared here; choose from {', '.join(OURS)}"
                         + "".join(f"; {m}: {w}" for m, w in NOT_COMPARED.items() if m in unknown))
    if not 1 <= args.train_images_per_task <= DATA_BATCH:
        raise SystemExit(f"--train-images-per-task must be 1..{DATA_BATCH}: with more, FusionBench's "
                         f"Fisher squares the gradients of other batches than ours")
    if not os.path.exists(args.fb_python):
        raise SystemExit(f"{args.fb_python}: no FusionBench environment; create it with "
                         f"`bash benchmarks/fusionbench_env.sh` (or pass --fb-python)")
    start = time.time()
    work = os.path.join(os.path.abspath(args.work), args.size)
    fixture, fb_dir, ours_dir = (os.path.join(work, d) for d in ("fixture", "fusionbench", "ours"))
    os.makedirs(work, exist_ok=True)
    for d in (fb_dir, ours_dir):
        if os.path.isdir(d):
            import shutil
            shutil.rmtree(d)
        os.makedirs(d)
    marker = os.path.join(fixture, "checkpoints", "fixture.json")
    fresh = True
    if args.reuse_fixture and os.path.exists(marker):
        with open(marker) as f:
            built = json.load(f)
        fresh = ((built["size"], built["tasks"], built.get("images_per_task"), built.get("train_images_per_task"))
                 != (args.size, TASKS, args.images_per_task, args.train_images_per_task))
    if fresh:
        names = os.path.join(work, "classnames.json")
        tasks = json.dumps({t: FUSIONBENCH_TASK_NAMES[t] for t in TASKS})
        log("class names from FusionBench; writing the fixture")
        run([args.fb_python, os.path.join(HERE, "_fusionbench_side.py"), "names", "--tasks-json", tasks,
             "--out", names], os.path.join(work, "names.log"))
        run([args.fb_python, os.path.join(HERE, "fusionbench_fixtures.py"), "--root", fixture, "--size",
             args.size, "--tasks", ",".join(TASKS), "--classnames", names, "--images-per-task",
             str(args.images_per_task), "--train-images-per-task", str(args.train_images_per_task)],
            os.path.join(work, "fixture.log"))
        if args.labels == "expert":
            run([args.fb_python, os.path.join(HERE, "_fusionbench_side.py"), "label", "--root", fixture,
                 "--tasks-json", tasks, "--batch-size", str(args.batch_size)], os.path.join(work, "label.log"))
    fusionbench_side(args, fixture, fb_dir, methods)
    base = os.path.join(fixture, "checkpoints", "openai", "clip-vit-base-patch32")
    theta0 = {k: v for k, v in read_hf_checkpoint(base).tensors.items() if k.startswith("vision_model.")}
    results, individual = {}, None
    for method in methods:
        try:
            ours = our_side(args, fixture, ours_dir, method)
            float64_statistics = (our_float64(args, fixture, ours_dir, method)
                                  if OURS[method][2] == "float64" else None)
        except SideFailed as e:  # a row that says so: a refusal on this data is a finding too
            log(f"{method}: our script failed: {e}")
            results[method] = {"error": str(e)}
            continue
        report = ours["report"]
        individual = individual or report.get("individual_accuracy")
        weights = compare_weights(method, OURS[method][2], our_states(method, ours["merged"], fixture),
                                  fb_dir, theta0)
        if float64_statistics and "f64" in weights:
            weights["ours64"] = relative_l2(our_states(method, float64_statistics, fixture)[""],
                                            fb_state(os.path.join(fb_dir, f"{method}.f64.safetensors")), theta0)
        results[method] = {"weights": weights, "accuracy": report["accuracy"]}
        log(f"{method}: worst relative L2 {fmt(weights['fb32']['worst'])} ({weights['fb32']['worst_key']})")
    with open(os.path.join(fb_dir, "accuracy.json")) as f:
        fb = json.load(f)
    import transformers
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "size": args.size,
            "images": args.images_per_task, "labels": args.labels, "versions": fb["versions"],
            "train_images": args.train_images_per_task if set(methods) & set(DATA_METHODS) else 0,
            "commit": git_commit(),
            "our_transformers": transformers.__version__}
    text = table(results, compare_heads(fixture, fb_dir), fb["accuracy"], individual, meta,
                 compare_pixels(args, fixture, fb_dir))
    path = os.path.join(work, "parity.md")
    with open(path, "w") as f:
        f.write(f"# FusionBench parity ({args.size})\n\n{text}")
    with open(os.path.join(work, "parity.json"), "w") as f:
        json.dump({m: {k: {kk: vv for kk, vv in v.items() if kk != "per_key"} if isinstance(v, dict) else v
                       for k, v in r["weights"].items()} for m, r in results.items()}, f, indent=1)
    print(text)
    log(f"table written to {path} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    try:
        main()
    except SideFailed as e:  # the fixture or FusionBench's side: no table without them
        raise SystemExit(f"[parity] {e}")
