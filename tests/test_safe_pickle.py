"""The restricted unpickler reads task_vectors-style pickled modules and refuses everything else."""
import collections
import io
import os
import pickle
import struct
import sys
import types
import warnings
import zipfile

import open_clip
import open_clip.model
import open_clip.transformer
import pytest
import torch
from torch import nn

from taskmerge.models import encoders as models
from taskmerge.storage import checkpoints, safe_pickle
from taskmerge.storage.safe_pickle import CheckpointError

# --- fakes of the original code, so that pickles carry the real checkpoints' class paths ---------

OPEN_CLIP_202_NAMES = {  # open_clip 2.0.2 kept these in open_clip.model (METHODS.md §4.1)
    open_clip.transformer.VisionTransformer: "VisualTransformer",
    open_clip.transformer.Transformer: "Transformer",
    open_clip.transformer.ResidualAttentionBlock: "ResidualAttentionBlock",
    open_clip.transformer.LayerNorm: "LayerNorm",
    open_clip.transformer.QuickGELU: "QuickGELU",
}


class TaskVectorsCode:
    """`src.modeling` (task_vectors), `src.models.modeling` (tall_masks), open_clip 2.0.2 names."""

    def __init__(self, monkeypatch, open_clip_202: bool = True):
        self.monkeypatch, self.open_clip_202 = monkeypatch, open_clip_202
        self.modules = {}
        for path in ("src", "src.modeling", "src.models", "src.models.modeling"):
            self.modules[path] = types.ModuleType(path)
            monkeypatch.setitem(sys.modules, path, self.modules[path])

        class ImageEncoder(nn.Module):  # task_vectors' ImageEncoder, keep_lang=False
            def __init__(self, clip, train_preprocess, val_preprocess):
                super().__init__()
                self.model = clip
                self.train_preprocess, self.val_preprocess = train_preprocess, val_preprocess
                self.cache_dir = None
                if hasattr(self.model, "transformer"):
                    delattr(self.model, "transformer")

            def forward(self, images):
                return self.model.encode_image(images)

        class ClassificationHead(nn.Linear):
            def __init__(self, normalize, weights, biases=None):
                out_dim, in_dim = weights.shape
                super().__init__(in_dim, out_dim)
                self.normalize = normalize
                self.weight = nn.Parameter(weights.clone())
                self.bias = nn.Parameter(torch.zeros(out_dim) if biases is None else biases.clone())

        self.ImageEncoder = self._place(ImageEncoder, "src.modeling")
        self.ClassificationHead = self._place(ClassificationHead, "src.modeling")
        self.TallHead = self._place(type("ClassificationHead", (ClassificationHead,), {}),
                                    "src.models.modeling")
        self.renamed = {}
        if open_clip_202:
            for base, name in OPEN_CLIP_202_NAMES.items():
                cls = type(name, (base,), {"__module__": "open_clip.model", "__qualname__": name})
                monkeypatch.setattr(open_clip.model, name, cls, raising=False)
                self.renamed[base] = cls

    def _place(self, cls, module):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(self.modules[module], cls.__name__, cls)
        return cls

    def image_encoder(self, seed: int = 0):
        torch.manual_seed(seed)
        clip = models.create_clip(models.TINY_MODEL)
        for module in clip.modules():  # swap in the 2.0.2 class names; behaviour is unchanged
            if type(module) in self.renamed:
                module.__class__ = self.renamed[type(module)]
        return self.ImageEncoder(clip, open_clip.image_transform(32, is_train=True),
                                 open_clip.image_transform(32, is_train=False)).eval()

    def head(self, classes: int = 5, tall_masks: bool = False, seed: int = 0):
        torch.manual_seed(seed)
        cls = self.TallHead if tall_masks else self.ClassificationHead
        return cls(True, torch.randn(classes, 128))


def save(obj, path, fmt: str) -> str:
    """Write `obj` as torch.save does (zip), as pre-1.6 torch did (legacy), or with pickle.dump."""
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        with warnings.catch_warnings():  # "Couldn't retrieve source code" of the fake classes
            warnings.simplefilter("ignore", UserWarning)
            torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    return str(path)


def pickle_bytes(path) -> bytes:
    """The main pickle's bytes (data.pkl inside a zip; the whole file otherwise)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    with open(path, "rb") as f:
        return f.read()


FORMATS = ["zip", "legacy", "pickle"]


@pytest.fixture
def code(monkeypatch):
    return TaskVectorsCode(monkeypatch)


# --- pickled modules ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_pickled_image_encoder_loads_as_its_state_dict(code, tmp_path, fmt):
    encoder = code.image_encoder()
    path = save(encoder, tmp_path / "zeroshot.pt", fmt)
    raw = pickle_bytes(path)
    for name in (b"src.modeling", b"ImageEncoder", b"VisualTransformer", b"ResidualAttentionBlock",
                 b"torchvision.transforms.transforms", b"Compose"):
        assert name in raw, name
    assert b"open_clip.transformer" not in raw  # really the 2.0.2 paths

    expected = encoder.state_dict()
    loaded = checkpoints.load_state_dict(path)
    assert list(loaded) == list(expected)
    assert all(k.startswith("model.") for k in loaded)
    assert "model.attn_mask" not in loaded  # non-persistent buffer, as in the real state_dict
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
        assert loaded[key].is_contiguous() and not loaded[key].requires_grad

    rebuilt = models.build_image_encoder(models.TINY_MODEL, loaded)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(images), encoder(images), atol=1e-6)


def test_open_clip_3_class_paths_are_allowed_too(monkeypatch, tmp_path):
    code = TaskVectorsCode(monkeypatch, open_clip_202=False)
    encoder = code.image_encoder()
    path = save(encoder, tmp_path / "enc.pt", "zip")
    assert b"open_clip.transformer" in pickle_bytes(path)
    loaded = safe_pickle.safe_load(path)
    assert list(loaded) == list(encoder.state_dict())


def test_stand_ins_record_the_pickled_objects_without_running_them(code, tmp_path):
    path = save(code.image_encoder(), tmp_path / "enc.pt", "zip")
    obj = safe_pickle.load_pickled_checkpoint(path)
    assert safe_pickle.is_stand_in(obj) and not isinstance(obj, nn.Module)
    assert safe_pickle.stand_in_name(obj) == "src.modeling.ImageEncoder"
    visual = obj._modules["model"]._modules["visual"]  # submodules live in _modules
    assert safe_pickle.stand_in_name(visual) == "open_clip.model.VisualTransformer"
    steps = [safe_pickle.stand_in_name(t) for t in obj.val_preprocess.transforms]
    assert steps[0] == "torchvision.transforms.transforms.Resize"
    assert obj.val_preprocess.transforms[0].size == 32


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tall_masks", [False, True])
def test_pickled_heads_load_as_weight_and_bias(code, tmp_path, fmt, tall_masks):
    head = code.head(tall_masks=tall_masks)
    path = save(head, tmp_path / "head.pt", fmt)
    assert (b"src.models.modeling" if tall_masks else b"src.modeling") in pickle_bytes(path)
    loaded = checkpoints.load_head(path)
    assert set(loaded) == {"weight", "bias"}
    assert torch.equal(loaded["weight"], head.weight) and torch.equal(loaded["bias"], head.bias)


def test_non_persistent_attn_mask_is_dropped_even_without_the_persistence_record(code, tmp_path):
    encoder = code.image_encoder()
    assert "attn_mask" in encoder.model._buffers
    del encoder.model.__dict__["_non_persistent_buffers_set"]  # as in pre-1.6 torch pickles
    loaded = safe_pickle.safe_load(save(encoder, tmp_path / "enc.pt", "zip"))
    assert "model.attn_mask" not in loaded
    assert len(loaded) == len(code.image_encoder().state_dict())


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensors_sharing_a_storage_and_odd_dtypes(tmp_path, fmt):
    base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    state = {"a": base, "col": base[:, 1], "t": base.t(), "half": torch.randn(5).half(),
             "bf16": torch.randn(2, 2).bfloat16(), "long": torch.arange(4),
             "flag": torch.tensor(True),
             "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    loaded = safe_pickle.safe_load(save(state, tmp_path / "sd.pt", fmt))
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def test_big_endian_zip_records_are_byteswapped(tmp_path):
    state = {"w": torch.randn(4, 3), "i": torch.arange(5, dtype=torch.int32)}
    little = save(state, tmp_path / "little.pt", "zip")
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name:
                size = 4  # both tensors here have 4-byte elements
                data = b"".join(data[i:i + size][::-1] for i in range(0, len(data), size))
            dst.writestr(name, data)
    loaded = safe_pickle.safe_load(str(big))
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


# --- refusals -------------------------------------------------------------------------------------

class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CallsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("fmt", FORMATS)
def test_code_execution_in_a_pickle_is_refused_and_never_runs(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = save({"weight": torch.zeros(2), "payload": RunsShell(marker)}, tmp_path / "evil.pt", fmt)
    for load in (checkpoints.load_state_dict, safe_pickle.load_pickled_checkpoint):
        with pytest.raises(CheckpointError) as err:
            load(path)
        message = str(err.value)
        assert str(path) in message and "posix.system" in message
        assert "can run code" in message and "do not add" in message
    assert not marker.exists()


def test_code_hidden_inside_a_pickled_module_is_refused(code, tmp_path):
    marker = tmp_path / "pwned"
    encoder = code.image_encoder()
    encoder.model.visual.hook = RunsShell(marker)  # a plain attribute deep in the module tree
    path = save(encoder, tmp_path / "enc.pt", "zip")
    with pytest.raises(CheckpointError, match="posix.system"):
        checkpoints.load_state_dict(path)
    assert not marker.exists()


def test_builtins_eval_is_refused(tmp_path):
    path = save([CallsEval()], tmp_path / "eval.pt", "pickle")
    with pytest.raises(CheckpointError, match=r"builtins\.eval"):
        safe_pickle.load_pickled_checkpoint(path)


def test_an_unknown_harmless_class_is_refused_with_the_allow_list_fix(tmp_path):
    import collections
    path = save({"counts": collections.Counter("aab")}, tmp_path / "counter.pt", "pickle")
    with pytest.raises(CheckpointError) as err:
        safe_pickle.load_pickled_checkpoint(path)
    message = str(err.value)
    assert "collections.Counter" in message and "ALLOWED_CLASSES" in message
    assert "convert_checkpoints.py" in message


def test_a_pickle_that_is_not_a_module_or_state_dict_is_refused(tmp_path):
    path = save({"weights": [1, 2, 3]}, tmp_path / "list.pt", "pickle")
    with pytest.raises(CheckpointError, match="state dict"):
        safe_pickle.safe_load(path)


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
    # Hand-built pickle: a 2-element storage read as a 3×3 tensor (corrupt or malicious geometry).
    buf = io.BytesIO()
    torch.save(torch.zeros(2)._typed_storage(), buf, _use_new_zipfile_serialization=False)
    storage = buf.getvalue()
    payload = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(ctorch.storage\n_load_from_bytes\n"
               + b"B" + struct.pack("<I", len(storage)) + storage + b"\x85R"  # the storage
               + b"K\x00K\x03K\x03\x86K\x03K\x01\x86\x89"  # offset 0, size (3,3), stride (3,1)
               + b"ccollections\nOrderedDict\n)RtR.")
    path = tmp_path / "crafted.pt"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match="crafted.pt: tensor of size .* past its storage"):
        safe_pickle.load_pickled_checkpoint(str(path))
    path.write_bytes(payload.replace(b"K\x03K\x03\x86K\x03", b"K\x01K\x02\x86K\x02"))
    assert torch.equal(safe_pickle.load_pickled_checkpoint(str(path)), torch.zeros(1, 2))


# --- malformed files: refused naming the file, never half-read (issue #11 §4) ------------------

class StorageRecord:
    """One storage of a hand-built legacy file, written as the persistent id `pid`."""

    def __init__(self, pid):
        self.pid = pid


class RebuiltTensor:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, StorageRecord) else None


def write_legacy(path, obj, roots: dict) -> str:
    """A pre-1.6 torch file by hand: magic, protocol, sys_info, pickle, keys, raw float32 storages."""
    f = io.BytesIO()
    for header in (safe_pickle.MAGIC_NUMBER, safe_pickle.LEGACY_PROTOCOL_VERSION,
                   {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, f, protocol=2)
    LegacyPickler(f, protocol=2).dump(obj)
    pickle.dump(list(roots), f, protocol=2)
    for values in roots.values():
        f.write(struct.pack("<q", len(values)) + struct.pack(f"<{len(values)}f", *values))
    path.write_bytes(f.getvalue())
    return str(path)


def legacy_view(view_offset, view_size, root_numel=4):
    """A pre-1.0 storage view: elements [view_offset, view_offset + view_size) of root '0'."""
    return StorageRecord(("storage", torch.FloatStorage, "0", "cpu", root_numel,
                          ("0v", view_offset, view_size)))


def test_a_legacy_storage_view_inside_its_storage_reads_its_elements(tmp_path):
    tensor = RebuiltTensor(legacy_view(1, 2), 0, (2,), (1,))
    path = write_legacy(tmp_path / "view.pt", {"w": tensor}, {"0": [1., 2., 3., 4.]})
    assert torch.equal(safe_pickle.safe_load(path)["w"], torch.tensor([2., 3.]))


@pytest.mark.parametrize("view_offset, view_size", [(2, 6), (5, 1), (-1, 2), (0, -2)])
def test_a_legacy_storage_view_reaching_past_its_storage_is_refused(tmp_path, view_offset,
                                                                    view_size):
    # torch's set_ would grow the 4-element storage and the tensor would read memory past it.
    tensor = RebuiltTensor(legacy_view(view_offset, view_size), 0, (max(view_size, 0),), (1,))
    path = write_legacy(tmp_path / "view.pt", {"w": tensor}, {"0": [1., 2., 3., 4.]})
    with pytest.raises(CheckpointError) as err:
        safe_pickle.safe_load(path)
    message = str(err.value)
    assert str(path) in message and "storage '0'" in message and "corrupt" in message


def test_a_zip_tensor_reaching_past_its_storage_is_refused_naming_the_storage(tmp_path):
    path = save({"w": torch.zeros(2)}, tmp_path / "z.pt", "zip")
    with zipfile.ZipFile(path) as z:
        records = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in records if n.endswith("data.pkl"))
    assert b"K\x00K\x02\x85" in records[name]  # storage offset 0, size (2,)
    records[name] = records[name].replace(b"K\x00K\x02\x85", b"K\x01K\x02\x85")
    with zipfile.ZipFile(path, "w") as z:
        for n, data in records.items():
            z.writestr(n, data)
    with pytest.raises(CheckpointError, match=r"z\.pt: tensor of size \(2,\) .*storage '0'"):
        safe_pickle.load_pickled_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"z\.pt"):
        checkpoints.load_state_dict(path)


def test_one_zip_storage_declared_with_two_sizes_is_refused(tmp_path):
    # Two tensors naming the same storage record with different element counts: one of them
    # would be read with the other's geometry.
    path = save({"a": torch.zeros(4), "b": torch.ones(4)}, tmp_path / "z.pt", "zip")
    with zipfile.ZipFile(path) as z:
        records = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in records if n.endswith("data.pkl"))
    record_b = b"X\x01\x00\x00\x001q\x0fh\x06K\x04"  # b's storage: key '1', cpu, 4 elements
    assert record_b in records[name]
    records[name] = records[name].replace(record_b, b"X\x01\x00\x00\x000q\x0fh\x06K\x02")
    with zipfile.ZipFile(path, "w") as z:
        for n, data in records.items():
            z.writestr(n, data)
    with pytest.raises(CheckpointError, match=r"z\.pt: storage '0' .*declared"):
        safe_pickle.load_pickled_checkpoint(path)


@pytest.mark.parametrize("length", [2 ** 40, 2 ** 62])
def test_a_length_field_larger_than_memory_is_a_checkpoint_error(tmp_path, length):
    path = tmp_path / "huge.pt"
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", length) + b"abc")  # BINBYTES8
    with pytest.raises(CheckpointError, match=r"huge\.pt: .*(truncated|corrupt)"):
        checkpoints.load_state_dict(str(path))


@pytest.mark.parametrize("internal, value", [("_parameters", [1, 2]), ("_modules", "visual"),
                                             ("_buffers", 3),
                                             ("_non_persistent_buffers_set", 7)])
def test_non_dict_module_internals_are_a_checkpoint_error(code, tmp_path, internal, value):
    encoder = code.image_encoder()
    encoder.model.visual.__dict__[internal] = value
    path = save(encoder, tmp_path / "enc.pt", "pickle")
    with pytest.raises(CheckpointError) as err:
        checkpoints.load_state_dict(path)
    assert str(path) in str(err.value) and internal in str(err.value)
    assert "model.visual" in str(err.value)


def test_a_module_tree_nested_too_deep_is_a_checkpoint_error(code, tmp_path):
    head = code.head()
    chain = head
    for _ in range(sys.getrecursionlimit()):  # deeper than a recursive walk can go
        child = nn.Identity()
        chain._modules["next"] = child
        chain = child
    path = tmp_path / "deep.pt"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20 * limit)  # the pickler recurses too
    try:
        with open(path, "wb") as f:
            pickle.dump(head, f, protocol=2)
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(CheckpointError, match=r"deep\.pt: .*nested"):
        checkpoints.load_state_dict(str(path))


@pytest.mark.parametrize("declared", [2 ** 60, -3, 3])
def test_a_legacy_storage_record_of_the_wrong_size_is_refused_naming_it(tmp_path, declared):
    tensor = RebuiltTensor(legacy_view(0, 4), 0, (4,), (1,))
    path = write_legacy(tmp_path / "sized.pt", {"w": tensor}, {"0": [1., 2., 3., 4.]})
    data = bytearray((tmp_path / "sized.pt").read_bytes())
    at = len(data) - 16 - 8  # the record's element count precedes its 16 bytes
    assert struct.unpack("<q", data[at:at + 8]) == (4,)
    data[at:at + 8] = struct.pack("<q", declared)
    (tmp_path / "sized.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"sized\.pt: storage '0' declares"):
        safe_pickle.safe_load(path)


def test_a_legacy_storage_cut_short_is_refused_naming_it(tmp_path):
    tensor = RebuiltTensor(legacy_view(0, 4), 0, (4,), (1,))
    path = write_legacy(tmp_path / "cut.pt", {"w": tensor}, {"0": [1., 2., 3., 4.]})
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:-5])
    with pytest.raises(CheckpointError, match=r"cut\.pt: storage '0' is truncated"):
        safe_pickle.safe_load(path)
