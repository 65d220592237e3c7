"""Atomic writes leave the old file or the new one, and the temporaries of killed writes are swept."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

from taskmerge.storage import atomic

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def writer(target, then: str) -> subprocess.Popen:
    """A process inside `atomic_path(target)` that has written 1 MB to its temporary, then `then`."""
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {SRC!r})
        from taskmerge.storage import atomic
        with atomic.atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x" * (1 << 20))
                f.flush()
            print(tmp, flush=True)
            {then}
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def temporaries(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def test_a_killed_writers_temporary_is_swept_by_the_next_write_to_its_folder(tmp_path):
    proc = writer(tmp_path / "merged.safetensors", "os.kill(os.getpid(), 9)")
    tmp = proc.stdout.readline().strip()
    assert proc.wait() == -9
    assert os.path.exists(tmp) and not os.path.exists(tmp_path / "merged.safetensors")
    (tmp_path / "other").mkdir()
    atomic.write_json(str(tmp_path / "other" / "r.json"), {})  # another folder: not swept
    assert os.path.exists(tmp)
    atomic.write_json(str(tmp_path / "results.json"), {"acc": 1})
    assert temporaries(tmp_path) == [] and os.listdir(tmp_path / "other") == ["r.json"]


def test_a_live_writers_temporary_is_never_swept(tmp_path):
    proc = writer(tmp_path / "merged.safetensors", "sys.stdin.readline()")
    try:
        tmp = proc.stdout.readline().strip()
        old = time.time() - 10 * atomic.STALE_AFTER_S  # even one not written to for long
        os.utime(tmp, (old, old))
        atomic.write_json(str(tmp_path / "results.json"), {})
        assert os.path.exists(tmp)
    finally:
        proc.communicate("go\n")
    assert proc.returncode == 0 and temporaries(tmp_path) == []
    assert os.path.getsize(tmp_path / "merged.safetensors") == 1 << 20


def test_temporaries_from_elsewhere_are_swept_only_when_old(tmp_path):
    names = {"other host, fresh": ".m.pt.0123abcd-4242.k3j_x9q0.tmp",
             "other host, old": ".m.pt.0123abcd-4243.k3j_x9q1.tmp",
             "before pids, fresh": ".m.pt.ab12cd34.tmp",
             "before pids, old": ".m.pt.ab12cd35.tmp"}
    assert not names["other host, fresh"].split(".")[3].startswith(atomic._HOST)
    old = time.time() - atomic.STALE_AFTER_S - 60
    for what, name in names.items():
        (tmp_path / name).write_bytes(b"x")
        if what.endswith("old"):
            os.utime(tmp_path / name, (old, old))
    atomic.write_text(str(tmp_path / "log.txt"), "x")
    assert temporaries(tmp_path) == sorted(n for w, n in names.items() if w.endswith("fresh"))


def test_nothing_but_our_own_temporaries_is_swept(tmp_path):
    old = time.time() - 10 * atomic.STALE_AFTER_S
    keep = [".notes.tmp", "data.tmp", ".m.pt.toolong123.tmp", ".m.pt.ab12cd34.tmp.bak",
            "m.pt.ab12cd34.tmp"]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".dir.ab12cd34.tmp").mkdir()  # a folder named like one of ours
    (tmp_path / "target").write_bytes(b"keep me")
    os.symlink(tmp_path / "target", tmp_path / ".link.ab12cd34.tmp")
    for name in keep + [".dir.ab12cd34.tmp", "target"]:
        os.utime(tmp_path / name, (old, old))
    atomic.write_text(str(tmp_path / "log.txt"), "x")
    assert sorted(os.listdir(tmp_path)) == sorted(keep + [".dir.ab12cd34.tmp", ".link.ab12cd34.tmp",
                                                          "target", "log.txt"])
    assert (tmp_path / "target").read_bytes() == b"keep me"


def test_a_temporary_of_a_dead_process_on_this_host_is_swept_whatever_its_age(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f".m.pt.{atomic._HOST}-{dead.pid}.abcdefgh.tmp"
    (tmp_path / name).write_bytes(b"x")
    mine = f".m.pt.{atomic._HOST}-{os.getpid()}.abcdefgh.tmp"  # e.g. another thread's write
    (tmp_path / mine).write_bytes(b"x")
    assert atomic.sweep_stale_temporaries(str(tmp_path)) == [str(tmp_path / name)]
    assert temporaries(tmp_path) == [mine]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    atomic.write_json(str(path), {"v": 1})
    with pytest.raises(TypeError):
        atomic.write_json(str(path), {"v": object()})
    assert path.read_text() == '{\n  "v": 1\n}\n' and temporaries(tmp_path) == []


def test_atomic_folder_replaces_a_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "safetensors"
    with atomic.atomic_folder(str(out)) as staging:
        atomic.write_text(os.path.join(staging, "a"), "1")
        assert not out.exists()
    assert sorted(os.listdir(out)) == ["a"] and os.stat(out).st_mode & 0o777 == 0o777 & ~current_umask()
    inode = os.stat(out / "a").st_ino
    with pytest.raises(RuntimeError):
        with atomic.atomic_folder(str(out)) as staging:
            atomic.write_text(os.path.join(staging, "a"), "2")
            atomic.write_text(os.path.join(staging, "b"), "2")
            raise RuntimeError("the third file is refused")
    assert sorted(os.listdir(out)) == ["a"] and (out / "a").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["safetensors"]
    with atomic.atomic_folder(str(out)) as staging:
        atomic.write_text(os.path.join(staging, "b"), "3")
    assert sorted(os.listdir(out)) == ["a", "b"] and os.stat(out / "a").st_ino == inode  # linked


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_killed_folder_writers_staging_folder_is_swept(tmp_path):
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {SRC!r})
        from taskmerge.storage import atomic
        with atomic.atomic_folder({str(tmp_path / "safetensors")!r}) as staging:
            atomic.write_bytes(os.path.join(staging, "zeroshot.safetensors"), b"x" * 1000)
            os.kill(os.getpid(), 9)
    """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    left = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(left) == 1 and os.path.isdir(tmp_path / left[0])
    atomic.write_text(str(tmp_path / "log.txt"), "x")
    assert sorted(os.listdir(tmp_path)) == ["log.txt"]
