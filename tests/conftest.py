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
