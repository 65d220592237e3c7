import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402

# Tests run tiny tensors: one thread avoids the scheduling overhead that dominates them on 2 cores.
torch.set_num_threads(1)


import pytest  # noqa: E402

# File digests are remembered in a cache folder (storage/digests.py): the tests' own, never the user's.
if "TASKMERGE_CACHE_DIR" not in os.environ:
    import tempfile  # noqa: E402
    os.environ["TASKMERGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="taskmerge-test-cache-")


@pytest.fixture(scope="session")
def micro_benchmark(tmp_path_factory):
    """The micro embedded benchmark (a few tasks, a few hundred images), built once per session."""
    from taskmerge.embedded.build import ensure_embedded_benchmark
    root = tmp_path_factory.mktemp("micro_benchmark")
    ckpt, data = str(root / "checkpoints"), str(root / "data")
    ensure_embedded_benchmark(ckpt, data, micro=True, progress=False)
    return ckpt, data


@pytest.fixture
def private_micro(micro_benchmark, tmp_path):
    """A private copy of the micro benchmark's model folder (without its caches), for tests that
    change or break it, on the shared data: (checkpoint_dir, data_location, model folder)."""
    import shutil
    ckpt, data = micro_benchmark
    model = "taskmerge-tiny-micro"
    shutil.copytree(os.path.join(ckpt, model), tmp_path / "ckpt" / model,
                    ignore=shutil.ignore_patterns("individual_accuracies_*", "adamerging", "feature_cache"))
    return str(tmp_path / "ckpt"), data, tmp_path / "ckpt" / model
