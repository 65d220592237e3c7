"""benchmarks/gpu_check.py, tiny, on the CPU: every row of its table measured, ratios from the
measured values; and benchmarks/memory_plan.py's counts against a real model."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

# the rows (§5), in the table's order
ROWS = ["adamerging_step", "adamerging_in_a_row", "surgery_v1_run", "surgery_v1_projected", "surgery_v2",
        "evaluation", "tsv_m", "large_adamerging_memory", "large_surgery_v2_memory"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "result.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--tiny=True",
                           "--device=cpu", "--threads=1", f"--out={out}"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_every_row_is_measured_and_its_ratio_comes_from_the_measurements(tiny_run):
    stdout, result = tiny_run
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ROWS
    for key, r in rows.items():
        assert "error" not in r and "skipped" not in r, r
        assert r["ours"] > 0 and r["reference"] > 0 and r["phase_s"] > 0 and r["peak_gib"] > 0, r
        expected = r["ours"] / r["reference"] if r["ratio_kind"] == "ours/ref" else r["reference"] / r["ours"]
        assert r["ratio"] == pytest.approx(expected, rel=1e-12), key
        assert f"{r['ratio']:.2f}×" in stdout          # the printed table shows that ratio
    # the memory rows set a measured peak beside the plan's total (on the CPU: the whole process's RSS)
    for key in ("large_adamerging_memory", "large_surgery_v2_memory"):
        assert rows[key]["unit"] == "GiB" and rows[key]["ours"] == pytest.approx(rows[key]["peak_gib"], rel=0.05)
    assert result["device"]["device"] == "cpu" and result["peak_kind"] == "peak RSS"
    assert result["total_s"] < 60, "tiny=True must stay under a minute on a CPU"


def test_time_guard_skips_the_phases_after_it_and_a_failure_stays_in_its_rows(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--tiny=True", "--device=cpu"])
    monkeypatch.setenv("TQDM_DISABLE", "1")   # what the import would set for good
    import _harness
    import gpu_check

    calls, clock = [], [0.0]
    monkeypatch.setattr(gpu_check, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def phase(name, seconds=0.0, fail=False):
        def run(peak):
            calls.append(name)
            clock[0] += seconds
            if fail:
                raise RuntimeError("CUDA out of memory")
            return [gpu_check.row(name, name, 2.0, 1.0, "ours/ref", "s")]
        return name, run, [name]

    rows = gpu_check.run_phases([phase("a", 1.0, fail=True), phase("b", 5.0), phase("c"), phase("d")], 4.0,
                                _harness.PeakMemory(torch.device("cpu")), 0.0)
    assert calls == ["a", "b"]      # b starts at 1 s, inside the 4 s budget; c would start at 6 s
    assert [r["key"] for r in rows] == ["a", "b", "c", "d"]
    assert rows[0]["error"] == "failed: RuntimeError: CUDA out of memory"
    assert rows[1]["ratio"] == 2.0 and rows[1]["phase_s"] == 5.0 and rows[1]["peak_gib"] > 0
    assert all(r["skipped"] == "skipped: the time guard (4 s) had passed at 6 s" for r in rows[2:])
    table = gpu_check.markdown(rows, "peak RSS")
    assert "| c | – | – | – | – | – | skipped: the time guard" in table


def test_memory_plan_counts_the_model_it_describes():
    import memory_plan
    from taskmerge.models.encoders import build_image_encoder

    encoder = build_image_encoder("taskmerge-tiny")
    sd = encoder.state_dict()
    p = memory_plan.plan("taskmerge-tiny", 3, 4, 16, 16, 2, 10, 100)
    assert p["params_all"] == sum(v.numel() for v in sd.values())
    assert p["params_vision"] == sum(v.numel() for k, v in sd.items() if k.startswith("model.visual."))
    assert (p["blocks"], p["width"], p["dim"], p["image_size"]) == (4, 128, 128, encoder.image_size)
    items = {what: n for what, n, _ in p["methods"]["LW-AdaMerging"]}
    assert items["task vectors, stacked (T=3, every key)"] == 3 * p["params_all"] * 4
    # what autograd keeps is linear in the batch: measured per image, nothing fixed
    act = p["activations"]["adamerging"]
    assert act["per_image"] > 0 and act["fixed"] == 0
    x = torch.randn(3, 3, 32, 32)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in sd.items() if k.startswith("model.visual.")}
    three = memory_plan.saved_bytes(lambda: torch.func.functional_call(encoder, leaves, (x,)).sum(),
                                    list(leaves.values()))
    assert three == 3 * act["per_image"]
