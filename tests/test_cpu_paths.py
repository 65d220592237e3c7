"""The embedded benchmark computes on the same CPU code paths everywhere (compute/cpu_paths.py): its
build runs pinned (in a child process when this one is not), an entry script restarts itself pinned,
and a pinned process's bits do not follow the CPU features the environment claims."""
import glob
import json
import os
import subprocess
import sys

import pytest
from script_variables import SRC, script_config, script_variables

from taskmerge.compute import cpu_paths
from taskmerge.embedded import build as eb
from taskmerge.runs.cli import main, wants_pinned_cpu_paths
from taskmerge.runs.data_free import run_data_free
from taskmerge.runs.methods import TaskArithmeticConfig

ROOT = os.path.dirname(SRC)
MICRO = "taskmerge-tiny-micro"

# What a CPU without AVX-512 (and, for glibc's libm, without AVX2 and FMA) would make the libraries
# that choose per CPU do, as far as an environment can claim it on this machine.
OTHER_CPU = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
             "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX2,-FMA"}
OLD_CPU = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

# Training steps of the tiny CLIP: the patch convolution (oneDNN), matmuls (MKL), attention,
# softmax, GELU and layer norm (ATen), AdamW; prints the sha256 of the trained weights.
WORKLOAD = """
import hashlib, sys
sys.path.insert(0, {src!r})
import torch
from taskmerge.models.encoders import TINY_MODEL, create_clip
torch.set_num_threads(1)
torch.manual_seed(0)
clip = create_clip(TINY_MODEL)
opt = torch.optim.AdamW(clip.visual.parameters(), lr=1e-3)
images, targets = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
for _ in range(3):
    logits = clip.encode_image(images)[:, :10] * 20
    loss = torch.nn.functional.cross_entropy(logits, targets)
    opt.zero_grad(); loss.backward(); opt.step()
h = hashlib.sha256()
for k, v in clip.visual.state_dict().items():
    h.update(k.encode()); h.update(v.detach().numpy().tobytes())
print(torch.backends.cpu.get_cpu_capability(), h.hexdigest())
"""


def _workload(env_changes, pinned):
    env = {k: v for k, v in os.environ.items() if k not in cpu_paths.PINNED}
    env.update(env_changes)
    if pinned:
        env = cpu_paths.pinned_environment(env)
    out = subprocess.run([sys.executable, "-c", WORKLOAD.format(src=SRC)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_pinned_bits_do_not_follow_the_cpu_features_the_environment_claims():
    reference = _workload({}, pinned=True)
    assert reference[0] == "DEFAULT"
    assert _workload(OTHER_CPU, pinned=True) == reference
    assert _workload(OLD_CPU, pinned=True) == reference
    native = _workload({}, pinned=False)
    if native[0] == "AVX512":
        # the claims reach the libraries: unpinned, the same workload changes with them here
        assert _workload(OLD_CPU, pinned=False)[1] != native[1]


def test_auto_pins_the_embedded_model_on_the_cpu_only(tmp_path):
    config = script_config("main_TaskArithmetic.py", model_name=MICRO, checkpoint_dir=str(tmp_path))
    assert wants_pinned_cpu_paths(config)
    assert not wants_pinned_cpu_paths(script_config("main_TaskArithmetic.py", model_name="ViT-B-32"))
    assert not wants_pinned_cpu_paths(script_config("main_TaskArithmetic.py", model_name=MICRO,
                                                    device="cuda"))
    assert not wants_pinned_cpu_paths(script_config("main_TaskArithmetic.py", model_name=MICRO,
                                                    cpu_paths="native"))
    assert wants_pinned_cpu_paths(script_config("main_TaskArithmetic.py", model_name="ViT-B-32",
                                                cpu_paths="pinned"))
    # "auto" with no real checkpoints under checkpoint_dir is the embedded benchmark
    assert wants_pinned_cpu_paths(script_config("main_TaskArithmetic.py", model_name="auto",
                                                checkpoint_dir=str(tmp_path)))


@pytest.mark.skipif(cpu_paths.is_pinned(), reason="this test process itself runs pinned")
def test_a_library_call_cannot_pin_itself(micro_benchmark, tmp_path, capsys):
    ckpt, data = micro_benchmark
    namespace = {"__name__": "__main__", "__file__": os.path.join(SRC, "main_TaskArithmetic.py"),
                 **script_variables("main_TaskArithmetic.py")}
    args = [f"--model_name={MICRO}", f"--checkpoint_dir={ckpt}", f"--data_location={data}",
            f"--log_dir={tmp_path}", "--save_dir=", "--cpu_paths=pinned"]
    with pytest.raises(SystemExit):
        main(run_data_free, TaskArithmeticConfig, namespace, args)
    err = capsys.readouterr().err
    assert "cpu_paths='pinned'" in err and "MKL_CBWR=COMPATIBLE" in err
    # "auto" computes natively, and the log and report say so
    report = run_data_free(script_config("main_TaskArithmetic.py", model_name=MICRO, checkpoint_dir=ckpt,
                                         data_location=data, log_dir=str(tmp_path), save_dir=""),
                           script="main_TaskArithmetic.py")
    assert report["compute"]["cpu_paths"] == "native"
    log, = glob.glob(os.path.join(tmp_path, "**", report["log"]), recursive=True)
    assert "CPU code paths: this machine's native ones" in open(log).read()


def _script(tmp_path, *args):
    ckpt, data = tmp_path
    out = subprocess.run([sys.executable, os.path.join("src", "main_TaskArithmetic.py"),
                          f"--model_name={MICRO}", f"--checkpoint_dir={ckpt}", f"--data_location={data}",
                          f"--log_dir={args[0]}", "--save_dir=", *args[1:]], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={k: v for k, v in os.environ.items() if k not in cpu_paths.PINNED})
    assert out.returncode == 0, out.stderr
    report, = [json.load(open(p)) for p in glob.glob(os.path.join(args[0], "**", "*.json"), recursive=True)]
    return out.stdout, report


def test_an_entry_script_restarts_itself_pinned_for_the_embedded_model(micro_benchmark, tmp_path):
    stdout, report = _script(micro_benchmark, str(tmp_path / "auto"))
    assert stdout.count("Restarting with the pinned CPU code paths") == 1
    compute = report["compute"]
    assert compute["cpu_paths"] == "pinned" and compute["cpu_capability"] == "DEFAULT"
    assert {k: compute[k] for k in cpu_paths.PINNED} == cpu_paths.PINNED
    stdout, report = _script(micro_benchmark, str(tmp_path / "native"), "--cpu_paths=native")
    assert "Restarting" not in stdout and report["compute"]["cpu_paths"] == "native"


def test_the_build_is_pinned_and_records_its_digests(micro_benchmark):
    ckpt, _ = micro_benchmark
    folder = os.path.join(ckpt, MICRO)
    manifest = eb.read_manifest(folder)
    assert manifest["environment"]["cpu_paths"] == "pinned"
    assert manifest["environment"]["cpu_capability"] == "DEFAULT"
    assert manifest["sha256"] == eb.file_digests(folder, manifest["tasks"])
    assert set(manifest["sha256"]) == set(eb.built_files(manifest["tasks"]))
    assert "sha256 " + manifest["sha256"]["zeroshot.pt"] + "  zeroshot.pt" in eb.summary(manifest)


def test_a_native_build_is_not_taken_for_the_pinned_one(micro_benchmark, tmp_path):
    from test_embedded_benchmark import TOY_RECIPE
    ckpt, data = str(tmp_path / "ckpt"), micro_benchmark[1]
    native = eb.ensure_embedded_benchmark(ckpt, data, micro=True, progress=False, recipe=TOY_RECIPE,
                                          pinned=False)
    first = eb.read_manifest(native)
    assert first["environment"]["cpu_paths"] == "native"
    pinned = eb.ensure_embedded_benchmark(ckpt, data, micro=True, progress=False, recipe=TOY_RECIPE)
    second = eb.read_manifest(pinned)
    assert pinned == native and second["environment"]["cpu_paths"] == "pinned"
    # no stage of the native build (its pretrained CLIP included) is reused by the pinned one
    assert all(second["stage_hashes"][k] != v for k, v in first["stage_hashes"].items())
