"""Our side of the parity benchmark: one entry script run as a user runs it, in this process.

  python3 benchmarks/_taskmerge_side.py [--open-clip-config FILE] src/main_X.py --key=value ...

The fixture's checkpoints are FusionBench's hub folders, found with `--model_name=ViT-B-32`. Its
tiny size is not ViT-B/32's architecture, so `--open-clip-config` registers the fixture's own open_clip
config under the name the scripts build ViT-B-32 from (`ViT-B-32-quickgelu`), in this process only;
the ViT-B/32-sized fixture needs none. Nothing else of the script is touched.
"""
from __future__ import annotations

import os
import runpy
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")


def register_as_vit_b_32(config_path: str) -> None:
    import open_clip
    from taskmerge.models.encoders import _register_configs, open_clip_name
    _register_configs()  # taskmerge's own configs first, so the override is scanned after them
    folder = tempfile.mkdtemp(prefix="parity-open-clip-")
    shutil.copy(config_path, os.path.join(folder, open_clip_name("ViT-B-32") + ".json"))
    open_clip.add_model_config(folder)


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.path.insert(0, SRC)
    if argv[:1] == ["--open-clip-config"]:
        register_as_vit_b_32(argv[1])
        argv = argv[2:]
    script, args = argv[0], argv[1:]
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
