"""Atomic writes: permissions as a plain open() gives them, and no orphan temporary files piling up."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from vision.atomic import atomic_write, current_umask, is_stale_temp_file, remove_stale_temp_files

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX modes and pids")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_file_mode_is_what_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        with atomic_write(tmp_path / "atomic.txt", "w") as f:
            f.write("x")
        assert current_umask() == umask
    finally:
        os.umask(old)
    assert _mode(tmp_path / "atomic.txt") == _mode(tmp_path / "plain.txt") == 0o666 & ~umask


def test_replacing_a_file_keeps_its_mode(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old")
    os.chmod(target, 0o640)
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and _mode(target) == 0o640


_KILLED_WRITER = """
import os, signal, sys
from vision.atomic import atomic_write
with atomic_write(sys.argv[1], "w") as f:
    f.write("half")
    f.flush()
    print(os.getpid(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _orphan(tmp_path, name="predictions.json"):
    """A temporary file left by a writer killed mid-write (its pid is gone afterwards)."""
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path / name)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    pid = int(proc.stdout.strip())
    (orphan,) = [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.{pid}.")]
    assert orphan.name.endswith(".vtmp") and not (tmp_path / name).exists()
    return orphan


def test_orphans_of_killed_writers_are_removed_and_nothing_else(tmp_path):
    orphan = _orphan(tmp_path)
    keep = [tmp_path / n for n in ("notes.tmp", ".x.json.123.tmp", ".x.json.abc.abcdefgh.vtmp", "a.json")]
    for p in keep:
        p.write_text("user file")
    # this process's own temporary file, as another thread would have it open right now
    own = tmp_path / f".y.json.{os.getpid()}.abcdefgh.vtmp"
    own.write_text("in progress")
    os.utime(own, (time.time() - 10_000,) * 2)
    assert is_stale_temp_file(orphan) and not is_stale_temp_file(own)
    assert remove_stale_temp_files(tmp_path) == [orphan]
    assert not orphan.exists() and own.exists() and all(p.exists() for p in keep)


def test_old_temp_files_of_a_live_pid_are_stale_only_when_idle(tmp_path):
    live = os.getppid()  # alive, and not this process
    fresh = tmp_path / f".a.pt.{live}.abcdefgh.vtmp"
    old = tmp_path / f".b.pt.{live}.abcdefg1.vtmp"
    fresh.write_text("being written")
    old.write_text("abandoned")
    os.utime(old, (time.time() - 3600,) * 2)
    assert remove_stale_temp_files(tmp_path, max_age_s=300) == [old]
    assert fresh.exists()


def test_a_write_clears_the_orphans_of_its_own_target(tmp_path):
    orphan = _orphan(tmp_path, "predictions.json")
    other = _orphan(tmp_path, "images.json")
    with atomic_write(tmp_path / "predictions.json", "w") as f:
        f.write("{}")
    assert not orphan.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["predictions.json", other.name])


def test_remove_stale_temp_files_on_a_missing_folder_is_a_no_op(tmp_path):
    assert remove_stale_temp_files(tmp_path / "nope") == []


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path, "w") as f:
        f.write("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
