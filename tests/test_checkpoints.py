"""Finding, reading, validating and converting expert checkpoints in the three layouts."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file
from test_safe_pickle import TaskVectorsCode, save

from taskmerge.models import encoders as models
from taskmerge.storage import checkpoints, digests
from taskmerge.storage.checkpoints import CheckpointError, CheckpointSet

MODEL = models.TINY_MODEL
TASKS = ["Cars", "MNIST", "DTD"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def code(monkeypatch):
    return TaskVectorsCode(monkeypatch)


def finetune(state: dict, seed: int) -> dict:
    """A fake expert: θ0 plus a small seeded change on every floating tensor."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def task_vectors_folder(code, root, fmt="zip"):
    """<root>/<model>/{zeroshot.pt, <Task>/finetuned.pt, head_<Task>.pt} as pickled modules."""
    model_dir = root / MODEL
    zeroshot = code.image_encoder()
    save(zeroshot, (model_dir.mkdir(parents=True) or model_dir) / "zeroshot.pt", fmt)
    expected = {"zeroshot": zeroshot.state_dict()}
    for i, task in enumerate(TASKS):
        expert = code.image_encoder()
        expert.load_state_dict(finetune(zeroshot.state_dict(), seed=i + 1))
        (model_dir / task).mkdir()
        save(expert, model_dir / task / "finetuned.pt", fmt if task != "MNIST" else "pickle")
        save(code.head(classes=3 + i, seed=i), model_dir / f"head_{task}.pt", fmt)
        expected[task] = expert.state_dict()
    return expected


def tall_masks_folder(code, root):
    """<root>/<model>/{MNISTVal/nonlinear_zeroshot.pt, <Task>Val/nonlinear_finetuned.pt} state
    dicts, with heads head_<Task>Val.pt as pickled src.models.modeling modules."""
    model_dir = root / MODEL
    zeroshot = models.build_image_encoder(MODEL).state_dict()
    (model_dir / "MNISTVal").mkdir(parents=True)
    torch.save(zeroshot, model_dir / "MNISTVal" / "nonlinear_zeroshot.pt")
    expected = {"zeroshot": zeroshot}
    for i, task in enumerate(TASKS):
        (model_dir / f"{task}Val").mkdir(exist_ok=True)
        expected[task] = finetune(zeroshot, seed=i + 1)
        torch.save(expected[task], model_dir / f"{task}Val" / "nonlinear_finetuned.pt")
        save(code.head(tall_masks=True, seed=i), model_dir / f"head_{task}Val.pt", "zip")
    return expected


def assert_same(reader, expected: dict):
    assert list(reader.keys()) == list(expected)
    for key, value in expected.items():
        assert torch.equal(reader[key], value), key


# --- layouts -------------------------------------------------------------------------------------

def test_task_vectors_layout_of_pickled_modules(code, tmp_path):
    expected = task_vectors_folder(code, tmp_path)
    found = CheckpointSet.discover(tmp_path, MODEL, TASKS)
    assert found.family == "task_vectors" and found.origin == "task_vectors"
    assert found.zeroshot_path == str(tmp_path / MODEL / "zeroshot.pt")
    assert found.model_dir == str(tmp_path / MODEL)
    assert found.finetuned_path("DTD") == str(tmp_path / MODEL / "DTD" / "finetuned.pt")
    with pytest.raises(KeyError, match="SUN397"):
        found.finetuned("SUN397")
    assert_same(found.pretrained(), expected["zeroshot"])
    for task in TASKS:  # MNIST was written with plain pickle.dump (the "Invalid magic number" case)
        assert_same(found.finetuned(task), expected[task])
        assert found.head_path(task) == str(tmp_path / MODEL / f"head_{task}.pt")
        assert found.head(task)["weight"].shape == (3 + TASKS.index(task), 128)
    found.validate()


def test_tall_masks_layout_of_state_dicts(code, tmp_path):
    expected = tall_masks_folder(code, tmp_path)
    found = CheckpointSet.discover(tmp_path, MODEL, TASKS)
    assert found.family == "tall_masks"
    assert found.zeroshot_path.endswith(os.path.join("MNISTVal", "nonlinear_zeroshot.pt"))
    assert_same(found.pretrained(), expected["zeroshot"])
    for task in TASKS:
        assert_same(found.finetuned(task), expected[task])
        assert found.head_path(task).endswith(f"head_{task}Val.pt")
        assert found.head(task)["bias"].abs().sum() == 0
    assert found.sources["Cars"].endswith(os.path.join("CarsVal", "nonlinear_finetuned.pt"))


def test_missing_files_name_both_layouts_and_the_readme(code, tmp_path):
    task_vectors_folder(code, tmp_path)
    os.remove(tmp_path / MODEL / "DTD" / "finetuned.pt")
    with pytest.raises(CheckpointError) as err:
        CheckpointSet.discover(tmp_path, MODEL, TASKS)
    message = str(err.value)
    assert os.path.join("DTD", "finetuned.pt") in message
    assert "nonlinear_finetuned.pt" in message and "zeroshot.safetensors" in message
    assert "Real checkpoints" in message


def test_head_path_of_a_missing_head_is_where_a_built_head_goes(tmp_path):
    model_dir = tmp_path / MODEL
    (model_dir / "Cars").mkdir(parents=True)
    state = models.build_image_encoder(MODEL).state_dict()
    torch.save(state, model_dir / "zeroshot.pt")
    torch.save(state, model_dir / "Cars" / "finetuned.pt")
    found = CheckpointSet.discover(tmp_path, MODEL, ["Cars"])
    assert found.head_path("Cars") == str(model_dir / "head_Cars.pt")
    with pytest.raises(CheckpointError, match="not found"):
        found.head("Cars")


# --- single files --------------------------------------------------------------------------------

def test_a_bare_open_clip_state_dict_reads_as_an_image_encoder(tmp_path):
    clip = models.create_clip(MODEL)
    path = str(tmp_path / "clip.safetensors")
    save_file(clip.state_dict(), path)
    expected = models.ImageEncoder(clip).state_dict()  # deletes the text transformer
    loaded = checkpoints.load_encoder_state_dict(path)
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    lazy = checkpoints.open_state_dict(path, encoder=True)
    assert set(lazy) == set(expected) and torch.equal(lazy["model.visual.proj"],
                                                      expected["model.visual.proj"])
    assert "transformer.resblocks.0.attn.in_proj_weight" in checkpoints.load_state_dict(path)


def test_a_head_is_not_an_encoder(code, tmp_path):
    path = save(code.head(), tmp_path / "head.pt", "zip")
    with pytest.raises(CheckpointError, match="not an open_clip image encoder"):
        checkpoints.load_encoder_state_dict(path)


def test_lazy_reader_reads_key_by_key(tmp_path, monkeypatch):
    state = {"model.a": torch.randn(4, 3), "model.b": torch.arange(5), "model.c": torch.ones(())}
    path = str(tmp_path / "sd.safetensors")
    save_file(state, path)
    reader = checkpoints.open_state_dict(path)
    reads = []  # (offset, bytes) of every read of tensor data from the file
    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset):
        reads.append((offset, sum(len(b) for b in buffers)))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(checkpoints.os, "preadv", counting_preadv)
    assert len(reader) == 3 and set(reader) == set(state) and "model.a" in reader
    assert reader.shape("model.a") == (4, 3) and reader.dtype("model.b") == torch.int64
    assert reads == []
    assert torch.equal(reader["model.b"], state["model.b"])
    assert len(reads) == 1 and reads[0][1] == 5 * 8  # only model.b's 5 int64 values
    assert torch.equal(reader["model.a"], state["model.a"]) and torch.equal(reader["model.c"], state["model.c"])
    assert not isinstance(checkpoints.open_state_dict(path), dict)
    torch.save(state, tmp_path / "sd.pt")
    assert isinstance(checkpoints.open_state_dict(str(tmp_path / "sd.pt")), dict)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle", "safetensors"])
def test_a_truncated_file_is_one_clear_error(code, tmp_path, fmt):
    path = tmp_path / "zeroshot.pt"
    if fmt == "safetensors":
        path = tmp_path / "zeroshot.safetensors"
        save_file(code.image_encoder().state_dict(), str(path))
    else:
        save(code.image_encoder(), path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError) as err:
        dict(checkpoints.open_state_dict(str(path)))
    assert str(path) in str(err.value)
    assert any(w in str(err.value) for w in ("truncated", "corrupt"))


def test_a_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        checkpoints.load_state_dict(str(tmp_path / "nope.pt"))


def test_file_digest_tracks_rewrites(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(os.urandom(3 << 20))
    first = checkpoints.file_digest(str(path))
    assert checkpoints.file_digest(str(path)) == first
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1))
    assert checkpoints.file_digest(str(path)) != first


def test_file_digest_sees_a_middle_edit_with_its_times_restored(tmp_path):
    # cp -p / rsync -a / touch -r keep the mtime: the old fingerprint (size, mtime, first and last
    # MiB) called this file unchanged and caches computed on the old expert were reused.
    path = tmp_path / "expert.bin"
    path.write_bytes(os.urandom(5 << 20))
    before = os.stat(path)
    first = checkpoints.file_digest(str(path))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns
    assert checkpoints.file_digest(str(path)) != first
    assert checkpoints.file_digest(str(path)) == digests.sha256_file(str(path))[:32]


def test_file_digest_is_remembered_across_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKMERGE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "expert.bin"
    path.write_bytes(os.urandom(1 << 20))
    reads = []
    real_sha = digests.sha256_file
    monkeypatch.setattr(digests, "sha256_file", lambda p: reads.append(p) or real_sha(p))
    first = checkpoints.file_digest(str(path))
    monkeypatch.setattr(digests, "_memo", None)  # as a new process: only the memo file is left
    assert checkpoints.file_digest(str(path)) == first
    assert len(reads) == 1
    assert os.path.exists(tmp_path / "cache" / digests.MEMO_NAME)


def test_a_corrupt_or_unwritable_digest_memo_only_costs_time(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / digests.MEMO_NAME).write_text("{ not json")
    monkeypatch.setenv("TASKMERGE_CACHE_DIR", str(cache))
    monkeypatch.setattr(digests, "_memo", None)
    path = tmp_path / "expert.bin"
    path.write_bytes(b"abc" * 1000)
    assert checkpoints.file_digest(str(path)) == digests.sha256_file(str(path))[:32]
    monkeypatch.setenv("TASKMERGE_CACHE_DIR", "/proc/taskmerge-cannot-write-here")
    monkeypatch.setattr(digests, "_memo", None)
    assert checkpoints.file_digest(str(path)) == digests.sha256_file(str(path))[:32]


def test_a_file_converted_by_an_older_taskmerge_is_still_up_to_date(tmp_path):
    path = tmp_path / "zeroshot.pt"
    path.write_bytes(os.urandom(3 << 20))
    assert checkpoints._same_source(str(path), digests.legacy_fingerprint(str(path)))
    assert checkpoints._same_source(str(path), checkpoints.file_digest(str(path)))
    assert not checkpoints._same_source(str(path), "0" * 32)


# --- validation ----------------------------------------------------------------------------------

@pytest.fixture
def experts():
    base = {"model.w": torch.randn(3, 2), "model.b": torch.zeros(3), "model.s": torch.tensor(1.0)}
    return base, {"Cars": finetune(base, 1), "DTD": finetune(base, 2)}


SOURCES = {"pretrained": "ckpt/zeroshot.pt", "Cars": "ckpt/Cars/finetuned.pt",
           "DTD": "ckpt/DTD/finetuned.pt"}


def test_matching_experts_pass(experts):
    checkpoints.validate_experts(*experts, SOURCES)


@pytest.mark.parametrize("break_it, words", [
    (lambda sd: sd.pop("model.b"), ["keys differ", "model.b"]),
    (lambda sd: sd.update({"model.extra": torch.zeros(1)}), ["keys differ", "model.extra"]),
    (lambda sd: sd.update({"model.w": torch.zeros(2, 3)}), ["model.w", "shape"]),
    (lambda sd: sd.update({"model.b": torch.zeros(3, dtype=torch.float16)}), ["model.b", "dtype"]),
    (lambda sd: sd["model.w"].__setitem__((1, 1), float("nan")), ["model.w", "NaN"]),
    (lambda sd: sd.update({"model.s": torch.tensor(float("inf"))}), ["model.s", "NaN/Inf"]),
])
def test_mismatched_experts_fail_naming_file_and_key(experts, break_it, words):
    base, finetuned = experts
    break_it(finetuned["DTD"])
    with pytest.raises(CheckpointError) as err:
        checkpoints.validate_experts(base, finetuned, SOURCES)
    message = str(err.value)
    assert "ckpt/DTD/finetuned.pt" in message and "Cars" not in message
    for word in words:
        assert word in message


def test_large_but_finite_values_are_not_mistaken_for_inf():
    base = {"h": torch.full((100,), 60000.0, dtype=torch.float16),  # sums past the fp16 range
            "d": torch.tensor([1e308, 1e308], dtype=torch.float64)}   # sums past the fp64 range
    checkpoints.validate_experts(base, {"Cars": {k: v.clone() for k, v in base.items()}})
    base["d"][1] = float("-inf")
    with pytest.raises(CheckpointError, match="the pre-trained checkpoint: key 'd' has 1 NaN/Inf"):
        checkpoints.validate_experts(base, {"Cars": {k: v.clone() for k, v in base.items()}})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_single_bad_value_anywhere_is_found(dtype, value):
    # the check is one min/max reduction; vectorised kernels treat the head, body and tail apart
    for position in (0, 1, 16, 500, 1022, 1023):
        tensor = torch.zeros(1024, dtype=dtype)
        tensor[position] = value
        with pytest.raises(CheckpointError, match="key 'k' has 1 NaN/Inf"):
            checkpoints.validate_experts({"k": torch.zeros(1024, dtype=dtype)}, {"t": {"k": tensor}})


def test_streamed_safetensors_read_back_with_the_safetensors_library(tmp_path):
    from safetensors import safe_open

    from taskmerge.storage import atomic
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 5, generator=g), "h": torch.randn(7, generator=g).half(),
               "b": torch.randn(2, 2, generator=g).bfloat16(), "d": torch.randn(3, generator=g).double(),
               "i": torch.arange(6).view(2, 3), "u": torch.arange(5, dtype=torch.uint8),
               "m": torch.tensor([True, False, True]), "s": torch.tensor(1.5), "e": torch.zeros(0, 4),
               "t": torch.randn(4, 6, generator=g).t()}  # not contiguous
    path = str(tmp_path / "out.safetensors")
    atomic.save_safetensors(tensors, path, metadata={"method": "ta", "tasks": 8})
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"method": "ta", "tasks": "8"}
        assert list(f.keys()) == sorted(tensors)
        for key, tensor in tensors.items():
            got = f.get_tensor(key)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), key
    reader = checkpoints.open_state_dict(path)
    assert all(torch.equal(reader[k], v) for k, v in tensors.items())
    assert [f for f in os.listdir(tmp_path)] == ["out.safetensors"]  # no temporary left behind


def test_a_nan_in_the_pretrained_model_names_it(experts):
    base, finetuned = experts
    base["model.b"][0] = float("nan")
    with pytest.raises(CheckpointError, match="ckpt/zeroshot.pt: key 'model.b'"):
        checkpoints.validate_experts(base, finetuned, SOURCES)


def test_validation_works_on_lazy_readers_from_files(code, tmp_path):
    expected = task_vectors_folder(code, tmp_path)
    broken = dict(expected["Cars"])
    broken["model.visual.proj"] = broken["model.visual.proj"].clone()
    broken["model.visual.proj"][0, 0] = float("nan")
    torch.save(broken, tmp_path / MODEL / "Cars" / "finetuned.pt")
    checkpoints.convert_to_safetensors(tmp_path, MODEL, TASKS)
    found = CheckpointSet.discover(tmp_path, MODEL, TASKS)
    assert found.family == "safetensors"
    with pytest.raises(CheckpointError) as err:
        found.validate()
    assert "Cars.safetensors" in str(err.value) and "model.visual.proj" in str(err.value)


# --- conversion ----------------------------------------------------------------------------------

def test_conversion_is_faithful_preferred_and_idempotent(code, tmp_path):
    expected = task_vectors_folder(code, tmp_path, fmt="legacy")
    done = checkpoints.convert_to_safetensors(tmp_path, MODEL, TASKS)
    out = tmp_path / MODEL / "safetensors"
    assert sorted(os.path.basename(p) for p in done["written"]) == sorted(
        ["zeroshot.safetensors"] + [f"{t}.safetensors" for t in TASKS]
        + [f"head_{t}.safetensors" for t in TASKS])
    assert done["skipped"] == []

    found = CheckpointSet.discover(tmp_path, MODEL, TASKS)
    assert found.family == "safetensors" and found.origin == "task_vectors"
    assert isinstance(found.pretrained(), checkpoints.SafetensorsReader)
    assert_same(found.pretrained(), expected["zeroshot"])  # same tensors, same key order
    for task in TASKS:
        assert_same(found.finetuned(task), expected[task])
        assert found.head_path(task) == str(out / f"head_{task}.safetensors")
        original = checkpoints.load_head(str(tmp_path / MODEL / f"head_{task}.pt"))
        assert all(torch.equal(found.head(task)[k], original[k]) for k in original)

    mtimes = {p: os.stat(p).st_mtime_ns for p in done["written"]}
    again = checkpoints.convert_to_safetensors(tmp_path, MODEL, TASKS)
    assert again["written"] == [] and sorted(again["skipped"]) == sorted(done["written"])
    assert {p: os.stat(p).st_mtime_ns for p in done["written"]} == mtimes

    # Touching an original changes nothing (its digest is of its bytes) ...
    dtd = tmp_path / MODEL / "DTD" / "finetuned.pt"
    later = os.stat(out / "DTD.safetensors").st_mtime_ns + 10**9
    os.utime(dtd, ns=(later, later))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CheckpointSet.discover(tmp_path, MODEL, TASKS).family == "safetensors"
    # ... a changed original makes the converted copy stale: discovery falls back, conversion redoes it.
    dtd.write_bytes((tmp_path / MODEL / TASKS[0] / "finetuned.pt").read_bytes())
    with pytest.warns(UserWarning, match="re-run src/convert_checkpoints.py"):
        assert CheckpointSet.discover(tmp_path, MODEL, TASKS).family == "task_vectors"
    redone = checkpoints.convert_to_safetensors(tmp_path, MODEL, TASKS)
    assert redone["written"] == [str(out / "DTD.safetensors")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CheckpointSet.discover(tmp_path, MODEL, TASKS).family == "safetensors"


def test_converting_the_tall_masks_layout(code, tmp_path):
    expected = tall_masks_folder(code, tmp_path)
    checkpoints.convert_to_safetensors(tmp_path, MODEL, TASKS)
    found = CheckpointSet.discover(tmp_path, MODEL, TASKS)
    assert found.family == "safetensors" and found.origin == "tall_masks"
    for task in TASKS:
        assert_same(found.finetuned(task), expected[task])
        assert found.head_path(task).endswith(f"head_{task}.safetensors")


def test_convert_script(code, tmp_path):
    expected = task_vectors_folder(code, tmp_path)
    cmd = [sys.executable, os.path.join(REPO, "src", "convert_checkpoints.py"),
           f"--checkpoint_dir={tmp_path}", f"--model_name={MODEL}", f"--tasks={TASKS!r}"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "wrote 7 files" in run.stdout
    reader = checkpoints.open_state_dict(str(tmp_path / MODEL / "safetensors" / "Cars.safetensors"))
    assert_same(reader, expected["Cars"])


# --- malformed safetensors: refused as the safetensors library refuses them (issue #11 §4) -----

def write_raw_safetensors(path, header: dict, data: bytes, header_bytes: bytes | None = None) -> str:
    """A .safetensors file by hand: u64 header length, the JSON header, the data section."""
    import json
    import struct
    encoded = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return str(path)


DATA = bytes(range(24))  # six float32 values' worth of bytes


def f32(shape, start, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, end]}


MALFORMED_SAFETENSORS = {
    # name: (header, data, header bytes or None, words the refusal must contain)
    "shape larger than its bytes": ({"a": f32([4], 0, 8), "b": f32([4], 8, 24)}, DATA, None,
                                    "'a'"),
    "shape smaller than its bytes": ({"a": f32([1], 0, 8), "b": f32([4], 8, 24)}, DATA, None, "'a'"),
    "overlapping tensors": ({"a": f32([2], 0, 8), "b": f32([2], 4, 12), "c": f32([3], 12, 24)},
                            DATA, None, "overlap"),
    "a gap between tensors": ({"a": f32([2], 0, 8), "b": f32([3], 12, 24)}, DATA, None, "gap"),
    "bytes after the last tensor": ({"a": f32([2], 0, 8), "b": f32([3], 8, 20)}, DATA, None,
                                    "after"),
    "a negative dimension": ({"a": f32([-2, -1], 0, 8), "b": f32([4], 8, 24)}, DATA, None, "'a'"),
    "a dimension that is not an integer": ({"a": f32([2.0], 0, 8), "b": f32([4], 8, 24)}, DATA,
                                           None, "'a'"),
    "offsets past the data": ({"a": f32([2], 0, 8), "b": f32([6], 8, 32)}, DATA, None, "'b'"),
    "offsets reversed": ({"a": f32([2], 8, 0), "b": f32([4], 8, 24)}, DATA, None, "'a'"),
    "an unknown dtype": ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]},
                          "b": f32([4], 8, 24)}, DATA, None, "Q7"),
    "an entry without a shape": ({"a": {"dtype": "F32", "data_offsets": [0, 8]},
                                  "b": f32([4], 8, 24)}, DATA, None, "'a'"),
    "metadata that is not strings": ({"__metadata__": {"n": 3}, "a": f32([6], 0, 24)}, DATA, None,
                                     "__metadata__"),
    "a header that is not an object": ({}, DATA, b"[1, 2, 3]", "header"),
    "a header that is not JSON": ({}, DATA, b"{not json", "header"),
    "a header length past the file": ({}, DATA, b"{}" + b" " * 6, "header"),
    "a duplicated tensor name": ({}, DATA, b'{"a": {"dtype": "F32", "shape": [6], '
                                           b'"data_offsets": [0, 24]}, "a": {"dtype": "F32", '
                                           b'"shape": [6], "data_offsets": [0, 24]}}', "'a'"),
}


@pytest.mark.parametrize("case", list(MALFORMED_SAFETENSORS))
def test_a_malformed_safetensors_file_is_refused_as_the_safetensors_library_refuses_it(tmp_path,
                                                                                      case):
    from safetensors import safe_open
    header, data, header_bytes, words = MALFORMED_SAFETENSORS[case]
    path = write_raw_safetensors(tmp_path / "m.safetensors", header, data, header_bytes)
    if case == "a header length past the file":
        with open(path, "r+b") as f:
            f.write((10 ** 6).to_bytes(8, "little"))
    if case != "a duplicated tensor name":  # which one is meant? safetensors takes the last
        with pytest.raises(Exception):  # the reference: safetensors refuses every other case
            with safe_open(path, framework="pt") as f:
                [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CheckpointError) as err:
        reader = checkpoints.SafetensorsReader(path)
        [reader[k] for k in reader]  # refused when opened, never while reading a tensor
    message = str(err.value)
    assert message.startswith(path) and words in message and "corrupt" in message


def test_a_refused_header_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch):
    path = write_raw_safetensors(tmp_path / "m.safetensors",
                                 {"a": f32([4], 0, 8), "b": f32([4], 8, 24)}, DATA)
    monkeypatch.setattr(checkpoints.os, "preadv", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(CheckpointError, match="'a'"):
        checkpoints.SafetensorsReader(path)


def test_a_well_formed_hand_written_file_reads_like_the_safetensors_library(tmp_path):
    from safetensors import safe_open
    header = {"__metadata__": {"note": "x"}, "b": f32([3], 8, 20), "a": f32([2], 0, 8),
              "e": f32([0, 5], 20, 20), "s": {"dtype": "I32", "shape": [], "data_offsets": [20, 24]}}
    path = write_raw_safetensors(tmp_path / "ok.safetensors", header, DATA)
    reader = checkpoints.SafetensorsReader(path)
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(reader) and f.metadata() == reader.metadata
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), reader[key]), key
    assert reader.read_flat("b", 1, 3).tolist() == reader["b"][1:3].tolist()


def test_a_malformed_key_order_record_is_a_checkpoint_error(tmp_path):
    header = {"__metadata__": {"key_order": "[not json"}, "a": f32([6], 0, 24)}
    path = write_raw_safetensors(tmp_path / "ko.safetensors", header, DATA)
    with pytest.raises(CheckpointError, match="key_order"):
        checkpoints.SafetensorsReader(path)


# --- conversion is all or nothing (issue #11 §4) ------------------------------------------------

def folder_state(folder):
    """{name: (inode, bytes)} of a folder's files, or None if it does not exist."""
    if not folder.exists():
        return None
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_a_conversion_with_one_refused_file_writes_no_folder(code, tmp_path):
    task_vectors_folder(code, tmp_path)
    model_dir = tmp_path / MODEL
    (model_dir / "DTD" / "finetuned.pt").write_bytes(b"\x80\x02corrupt")  # converted last of 3
    with pytest.raises(CheckpointError, match="DTD"):
        checkpoints.convert_to_safetensors(tmp_path, MODEL, TASKS)
    assert not (model_dir / "safetensors").exists()
    assert sorted(p.name for p in model_dir.iterdir() if p.name.startswith(".")) == []


def test_a_failed_reconversion_leaves_the_previous_folder_intact(code, tmp_path):
    task_vectors_folder(code, tmp_path)
    model_dir, out = tmp_path / MODEL, tmp_path / MODEL / "safetensors"
    checkpoints.convert_to_safetensors(tmp_path, MODEL, TASKS)
    before = folder_state(out)
    for task in ("Cars", "DTD"):  # both changed since; Cars converts fine, DTD is refused
        expert = code.image_encoder(seed=7)
        save(expert, model_dir / task / "finetuned.pt", "zip")
    (model_dir / "DTD" / "finetuned.pt").write_bytes(b"\x80\x02corrupt")
    with pytest.raises(CheckpointError, match="DTD"):
        checkpoints.convert_to_safetensors(tmp_path, MODEL, TASKS)
    assert folder_state(out) == before  # not even Cars.safetensors was replaced
    assert sorted(p.name for p in model_dir.iterdir() if p.name.startswith(".")) == []


def test_a_reconversion_keeps_the_files_it_does_not_redo(code, tmp_path):
    task_vectors_folder(code, tmp_path)
    out = tmp_path / MODEL / "safetensors"
    checkpoints.convert_to_safetensors(tmp_path, MODEL, TASKS)
    (out / "notes.txt").write_text("mine")
    before = folder_state(out)
    expert = code.image_encoder(seed=9)
    save(expert, tmp_path / MODEL / "Cars" / "finetuned.pt", "zip")
    done = checkpoints.convert_to_safetensors(tmp_path, MODEL, ["Cars"])  # a subset of the tasks
    assert done["written"] == [str(out / "Cars.safetensors")]
    after = folder_state(out)
    assert set(after) == set(before) and after["Cars.safetensors"] != before["Cars.safetensors"]
    assert {k: v for k, v in after.items() if k != "Cars.safetensors"} == \
        {k: v for k, v in before.items() if k != "Cars.safetensors"}  # same files, not copies
    assert_same(checkpoints.open_state_dict(str(out / "Cars.safetensors")), expert.state_dict())


def test_a_folder_given_as_a_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        checkpoints.load_state_dict(str(tmp_path))
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        checkpoints.SafetensorsReader(str(tmp_path))


def test_a_converted_file_without_its_source_record_is_a_checkpoint_error(tmp_path):
    from taskmerge.storage import atomic
    out = tmp_path / MODEL / "safetensors"
    state = models.build_image_encoder(MODEL).state_dict()
    for name in ("zeroshot", "Cars"):
        atomic.save_safetensors(state, str(out / f"{name}.safetensors"),
                                metadata={"format": checkpoints._FORMAT_TAG})  # no "source"
    with pytest.raises(CheckpointError, match=r"zeroshot\.safetensors.*source"):
        CheckpointSet.discover(tmp_path, MODEL, ["Cars"])


def _flip_a_byte_of_record(path, suffix="data/0"):
    """Flip one byte inside a stored zip record (torch writes them uncompressed), as a bad copy would."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    data = bytearray(open(path, "rb").read())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_a_torch_zip_with_a_flipped_byte_is_refused(tmp_path):
    """torch.load does not check the zip's CRC-32 and would return a changed weight."""
    from taskmerge.adaptive.training_state import read_resume_state
    from taskmerge.storage.errors import InputError
    path = str(tmp_path / "finetuned.pt")
    torch.save({"model.visual.proj": torch.arange(64, dtype=torch.float32)}, path)
    _flip_a_byte_of_record(path)
    with pytest.raises(CheckpointError, match=r"finetuned\.pt: record 'finetuned/data/0' fails its CRC-32"):
        checkpoints.load_state_dict(path)
    resume = str(tmp_path / "adamerging_x.pt")
    torch.save({"key": {"run": 1}, "step": torch.arange(64)}, resume)
    _flip_a_byte_of_record(resume)
    with pytest.raises(InputError, match=r"adamerging_x\.pt: cannot be read as a resume state"):
        read_resume_state(resume)
