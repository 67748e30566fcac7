"""All-or-nothing file writes: a crash, a kill or a full disk leaves the old file or the new one.

The data goes to a temporary file in the target's folder (the same file system, so the final rename
is atomic), is flushed to disk, and is renamed over the target; the folder is then synced so that the
rename itself survives a power cut.  A failure removes the temporary file and leaves the target as it was.

The new file gets the permissions a plain ``open(path, "w")`` would give it (``0o666`` less the umask,
or the mode of the file it replaces), not ``mkstemp``'s private ``0o600``.  A process killed mid-write
cannot remove its temporary file, so temporary files are named ``.<target>.<pid>.<random>.vtmp``:
``remove_stale_temp_files`` recognises the ones whose writer is gone (or that nobody has written to for
a while), and every ``atomic_write`` clears those left over from earlier writes of its own target.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".vtmp"
# .<target name>.<writer pid>.<mkstemp's 8 random characters>.vtmp
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")
STALE_AFTER_S = 300.0  # a temporary file nobody wrote to for this long is abandoned
_UMASK_LOCK = threading.Lock()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Makes a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it: keep the window to one thread
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)  # open() on an existing file keeps its mode
    except OSError:
        return 0o666 & ~current_umask()


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) is not a probe on Windows: assume the writer lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def is_stale_temp_file(path: str | os.PathLike, max_age_s: float = STALE_AFTER_S, now: float | None = None) -> bool:
    """Whether ``path`` is an ``atomic_write`` temporary file whose writer is gone (its pid no longer
    runs on this machine) or that was last written more than ``max_age_s`` ago.  This process's own
    temporary files are never stale."""
    m = _TEMP_RE.match(Path(path).name)
    if m is None:
        return False
    pid = int(m.group("pid"))
    if pid == os.getpid():
        return False
    if not _pid_alive(pid):
        return True
    try:
        age = (time.time() if now is None else now) - os.stat(path).st_mtime
    except OSError:
        return False
    return age > max_age_s


def remove_stale_temp_files(
    folder: str | os.PathLike, max_age_s: float = STALE_AFTER_S, target: str | None = None
) -> list[Path]:
    """Removes the stale ``atomic_write`` temporary files in ``folder`` (not its sub-folders); returns them.

    Writers that keep a folder for long (run folders, prediction outputs) call it when they start, so
    files left by killed runs do not pile up.  ``target`` limits it to the temporary files of one file
    name.  Only names of the ``.<target>.<pid>.<random>.vtmp`` pattern are ever touched.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    prefix = f".{target}." if target is not None else "."
    now = time.time()
    for entry in entries:
        name = entry.name
        if not (name.endswith(TEMP_SUFFIX) and name.startswith(prefix)):
            continue
        m = _TEMP_RE.match(name)
        if m is None or (target is not None and m.group("target") != target):
            continue
        if is_stale_temp_file(entry.path, max_age_s, now) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` for writing, except that ``path`` changes only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent, target=path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        fchmod = getattr(os, "fchmod", None)  # not on Windows, where files have no such modes
        if fchmod is not None:
            with contextlib.suppress(OSError):  # file systems without modes (some mounts) keep mkstemp's
                fchmod(fd, _new_file_mode(path))
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) until the block ends: processes
    sharing a folder take turns at what must not interleave (merging outputs, making a cached file)."""
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
