"""The restricted unpickler reads task_vectors-style pickled modules and refuses everything else."""
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
