"""Folders that refuse writes (a full or read-only disk, a path under /proc or /dev/null) are said in
one line naming the folder, before any work where the run can know; nothing older is lost and no
temporary is left."""
import errno
import os

import pytest
from script_variables import script_config

from taskmerge.runs.data_free import run_data_free
from taskmerge.storage import atomic
from taskmerge.storage.errors import InputError


@pytest.mark.parametrize("folder", ["/proc/taskmerge-out", "/dev/null/taskmerge-out"])
def test_a_folder_that_cannot_be_written_is_refused_naming_the_setting(folder):
    with pytest.raises(atomic.OutputFolderError) as e:
        atomic.check_writable(folder, "save_dir")
    assert f"save_dir={folder!r}" in str(e.value) and "\n" not in str(e.value)


def test_a_writable_folder_is_created_and_left_clean(tmp_path):
    atomic.check_writable(str(tmp_path / "a" / "b"), "log_dir")
    assert os.listdir(tmp_path / "a" / "b") == []


def test_a_full_disk_during_a_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    atomic.write_json(str(path), {"old": True})
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(atomic.OutputFolderError) as e:
        atomic.write_json(str(path), {"new": True})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert "no space left" in str(e.value) and str(path) in str(e.value)
    assert path.read_text().strip().endswith("}") and '"old": true' in path.read_text()
    assert os.listdir(tmp_path) == ["report.json"]


def test_a_read_only_file_system_is_said_in_one_line(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    with pytest.raises(atomic.OutputFolderError, match="read-only file system"):
        atomic.write_bytes(str(tmp_path / "x.bin"), b"1")
    with pytest.raises(atomic.OutputFolderError, match="read-only file system"):
        atomic.check_writable(str(tmp_path), "resume_dir")


@pytest.mark.parametrize("setting", ["log_dir", "save_dir"])
def test_a_run_with_an_unwritable_output_folder_stops_before_any_work(micro_benchmark, tmp_path, setting, monkeypatch):
    ckpt, data = micro_benchmark
    merged = []
    import dataclasses

    from taskmerge.runs import registry
    method = registry.METHODS["task_arithmetic"]
    monkeypatch.setitem(registry.METHODS, "task_arithmetic", dataclasses.replace(
        method, merge=lambda *a: merged.append(1) or pytest.fail("merged before the folders were checked")))
    settings = {"model_name": "taskmerge-tiny-micro", "checkpoint_dir": ckpt, "data_location": data,
                "log_dir": str(tmp_path / "logs"), "save_dir": str(tmp_path / "merged"),
                setting: "/proc/taskmerge-out"}
    with pytest.raises(InputError, match=f"setting {setting}="):
        run_data_free(script_config("main_TaskArithmetic.py", **settings), script="main_TaskArithmetic.py")
    assert merged == []
