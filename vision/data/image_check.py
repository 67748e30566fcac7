"""The start-up check of a data set's image files: headers and end markers, in parallel, once per job.

A run must not stall hours in on a truncated or corrupt file, so every image is checked before the
first step.  ``check_image_file`` reads only a file's first 64 KiB and last 4 KiB; a thread pool overlaps
those reads (most of the cost on network and cold disks); and the answers are cached, keyed by each
file's size and modification time, so a second run, and the other ranks of a ``torchrun`` job, only
``stat`` the files.  Under ``torchrun`` rank 0 checks and writes the cache while the others wait at a
barrier, then read it.

The cache is a JSON file beside the annotations (``train.json`` -> ``train.json.vision-images.json``),
or, where that folder is read-only, in the user's cache folder (``$XDG_CACHE_HOME/vision/image-checks``).
A file changed since it was checked is checked again; a cache that cannot be read is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vision.atomic import atomic_write
from vision.data.image_io import check_image_file
from vision.errors import ImageReadError

log = logging.getLogger(__name__)

CACHE_SUFFIX = ".vision-images.json"
_CACHE_VERSION = 1
_THREADS = 16


def _signature(path: str) -> tuple[int, int] | None:
    """(size, modification time in ns), or None where the file cannot be stat'ed (it is checked anyway)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _check(path: str) -> str | None:
    """The one-line error of an unreadable file, None for a readable one."""
    try:
        check_image_file(path)
    except ImageReadError as e:
        return str(e)
    return None


def _writable(folder: Path) -> bool:
    """Whether to write into ``folder``: its owner may write and so may this process.  The mode bits
    count too, so a data set made read-only on purpose is left alone even by root, who may write anyway."""
    try:
        return bool(os.stat(folder).st_mode & stat.S_IWUSR) and os.access(folder, os.W_OK)
    except OSError:
        return False


def cache_path_for(annotations: str | os.PathLike) -> Path:
    """Where the check of the images an annotation file (or folder) lists is cached."""
    ann = Path(os.path.abspath(annotations))
    beside = ann.parent / (ann.name + CACHE_SUFFIX)
    if _writable(ann.parent):
        return beside
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vision" / "image-checks"
    return root / (hashlib.sha1(str(ann).encode()).hexdigest()[:16] + CACHE_SUFFIX)


def _read_cache(path: Path | None) -> dict[str, list]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _write_cache(path: Path, files: dict[str, list]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as f:
            json.dump({"version": _CACHE_VERSION, "files": files}, f)
    except OSError as e:  # a cache is an optimisation: a run never fails for want of one
        log.debug("image check cache not written (%s): %s", path, e)


def check_images(paths: Sequence[str], cache: Path | None = None, threads: int = _THREADS) -> dict[str, str]:
    """``{path: error}`` for the unreadable files among ``paths`` (absolute or relative, as given).

    Files whose size and modification time match the cache take no read; the rest are checked by
    ``threads`` threads and the cache is rewritten when anything was checked.
    """
    cached = _read_cache(cache)
    keys = [os.path.abspath(p) for p in paths]
    signatures = [_signature(k) for k in keys]
    errors: dict[str, str] = {}
    todo: list[int] = []
    for i, (key, sig) in enumerate(zip(keys, signatures)):
        entry = cached.get(key)
        if sig is not None and entry is not None and entry[:2] == list(sig):
            if entry[2] is not None:
                errors[paths[i]] = entry[2]
        else:
            todo.append(i)
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo)))) as pool:
            found = list(pool.map(_check, [paths[i] for i in todo], chunksize=64))
        for i, error in zip(todo, found):
            if error is not None:
                errors[paths[i]] = error
            if signatures[i] is not None:
                cached[keys[i]] = [*signatures[i], error]
        if cache is not None:
            _write_cache(cache, cached)
    return errors


def check_images_once_per_job(paths: Sequence[str], annotations: str | os.PathLike | None) -> dict[str, str]:
    """``check_images`` with the cache of ``annotations`` (none where that is not a file or folder).

    Under ``torchrun`` rank 0 checks; the others wait for it and read its cache (or, where none could be
    written, check for themselves)."""
    from vision.runtime import distributed as du

    cache = cache_path_for(annotations) if annotations and os.path.exists(annotations) else None
    info = du.dist_info()
    if info.enabled:
        if info.is_main:
            errors = check_images(paths, cache)
            du.barrier()
            return errors
        du.barrier()
    return check_images(paths, cache)
