"""The one folder runner every task predicts through: decode in workers, predict, log, resume, merge.

- Images are decoded in DataLoader worker processes with a bounded prefetch, so memory stays flat however
  large the folder; an unreadable or oversized image is reported, listed in ``skipped.json`` and skipped.
- Each finished image is appended at once to this process's own log, ``predictions.partial.<tag>.jsonl``
  (``rank<R>`` under ``torchrun``, host and pid otherwise), keyed by the image's path relative to the
  source.  A re-run with the same ``--out`` skips every image any log holds; a killed run loses at most
  the image it was writing.
- ``run.json`` records what produced the folder (the task, each model's weights digest and settings, the
  source folder).  A run with anything different is refused unless ``overwrite`` is given, so results of
  other weights, thresholds or folders are never passed off as "already done".
- Processes may share an ``--out``: ``torchrun`` ranks each take every world_size-th image still to do,
  ``shard=(k, n)`` splits the work between independent processes, and two runs of the same command simply
  both contribute.  Logs are per process, so none overwrites another's; the outputs are merged from all
  logs under a file lock, and image ids are kept from the last merge (new images get the next ids), so
  an image's id never changes once given.
- The task's writer (``writers.py``) turns a prediction into a log entry and the merged entries into the
  task's files (COCO results, masks, top-k tables).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vision.atomic import atomic_write, exclusive_lock, remove_stale_temp_files
from vision.data.image_io import read_image
from vision.data.loader import seed_worker
from vision.errors import ImageReadError, VisionError
from vision.runtime import distributed as du

log = logging.getLogger(__name__)

MANIFEST = "run.json"
SKIPPED = "skipped.json"
LOCK = ".predict.lock"
PARTIAL_GLOB = "predictions.partial*.jsonl"


class Writer(Protocol):
    """What a task writes: one log entry per image, then its output files from all entries."""

    outputs: list[str]  # file names it writes into the output folder, for the summary line

    def entry(self, name: str, image: torch.Tensor | None, size: tuple[int, int], pred: dict[str, Any]) -> dict:
        ...

    def count(self, entry: dict[str, Any]) -> int:  # what the summary counts (detections), 0 if nothing
        ...

    def finish(self, out_dir: Path, images: list[dict[str, Any]], entries: Iterable[dict[str, Any]]) -> None:
        ...


class Predicts(Protocol):
    device: torch.device

    def predict(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        ...


@dataclass
class RunSummary:
    done: int = 0
    resumed: int = 0
    skipped: list[str] = field(default_factory=list)
    counted: int = 0  # the writer's count (detections), summed

    def line(self, verb: str, what: str, counted_name: str, outputs: Sequence[Path]) -> str:
        counted = f", {self.counted} {counted_name}" if counted_name else ""
        return (
            f"{verb} {self.done} images ({self.resumed} already done, {len(self.skipped)} unreadable skipped)"
            f"{what}{counted} -> {', '.join(str(p) for p in outputs)}"
        )


# Decoding ----------------------------------------------------------------------------------------------


class ImageFiles(Dataset):
    """Decodes images by path in DataLoader workers; a bad file yields its error instead of pixels.

    ``preprocess`` (the task's, e.g. a classifier's resize and crop) runs in the worker too; the
    original size always travels with the image, and the original pixels when ``keep_original`` asks
    for them beside a preprocessed input (without ``preprocess`` the input is the original)."""

    def __init__(self, paths: Sequence[str], preprocess: Callable[[np.ndarray], torch.Tensor] | None = None,
                 keep_original: bool = False):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.keep_original = keep_original

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(
        self, index: int
    ) -> tuple[int, torch.Tensor | None, torch.Tensor | None, tuple[int, int], str | None]:
        """``(index, model input, original uint8 CHW or None, (h, w), error)``."""
        try:
            image = read_image(self.paths[index])
        except ImageReadError as e:
            return index, None, None, (0, 0), str(e)
        size = (int(image.shape[0]), int(image.shape[1]))
        pixels = torch.from_numpy(image).permute(2, 0, 1)
        if self.preprocess is not None:
            return index, self.preprocess(image), pixels if self.keep_original else None, size, None
        return index, pixels, pixels, size, None


def _keep_lists(batch: list) -> list:
    return batch


def iter_predictions(
    predictor: Predicts,
    paths: Sequence[str],
    *,
    batch_size: int = 2,
    num_workers: int = 2,
    preprocess: Callable[[np.ndarray], torch.Tensor] | None = None,
    keep_original: bool = False,
) -> Iterator[tuple[int, torch.Tensor | None, tuple[int, int], dict[str, Any] | None, str | None]]:
    """``(index into paths, original uint8 CHW image or None, (h, w), prediction, error)`` for each path,
    in batches.  The original is there without ``preprocess``, and with it where ``keep_original``.

    An unreadable file comes out with its error and no prediction; it never stops the others."""
    if batch_size < 1:
        raise VisionError(f"batch size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise VisionError(f"decoding workers must be 0 or more, got {num_workers}")
    # A worker can only help by decoding a batch while the model runs on another, so no more workers than
    # batches after the first: one photo is decoded in this process, without starting any.
    num_workers = min(num_workers, max(0, math.ceil(len(paths) / batch_size) - 1))
    loader = DataLoader(
        ImageFiles(paths, preprocess, keep_original), batch_size=batch_size, num_workers=num_workers, collate_fn=_keep_lists,
        pin_memory=predictor.device.type == "cuda", worker_init_fn=seed_worker if num_workers else None,
        prefetch_factor=2 if num_workers else None,
    )
    for batch in loader:
        good = [(i, img) for i, img, _, _, err in batch if err is None]
        outputs = predictor.predict([img for _, img in good]) if good else []
        preds = {i: o for (i, _), o in zip(good, outputs)}
        for i, _, original, size, err in batch:
            yield i, original, size, preds.get(i), err


# Names, logs, manifest -------------------------------------------------------------------------------


def source_root(source: str | os.PathLike, paths: Sequence[str]) -> Path | None:
    """The folder image names are relative to: the source folder, else the images' common folder."""
    if Path(source).is_dir():
        return Path(source).resolve()
    if not paths:
        return None
    parents = [str(Path(p).resolve().parent) for p in paths]
    return Path(os.path.commonpath(parents))


def relative_name(path: str, root: Path | None) -> str:
    if root is not None:
        with contextlib.suppress(ValueError):
            return Path(path).resolve().relative_to(root).as_posix()
    return Path(path).as_posix()


def _log_tag() -> str:
    info = du.dist_info()
    if info.enabled:
        return f"rank{info.rank}"
    return f"{socket.gethostname()}-{os.getpid()}".replace(".", "_")


def _iter_log(path: Path) -> Iterator[dict[str, Any]]:
    """Entries of one log; a torn line (a run killed mid-write) is skipped."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("image"), dict) and "file_name" in entry["image"]:
                yield entry


def _logs(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob(PARTIAL_GLOB))


def done_names(out_dir: Path) -> set[str]:
    """The images some run has finished into ``out_dir``."""
    return {e["image"]["file_name"] for p in _logs(out_dir) for e in _iter_log(p) if "skipped" not in e}


def _open_for_append(path: Path):
    """Append mode, starting on a fresh line if a killed run left half a line behind."""
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            with open(path, "a") as f:
                f.write("\n")
    return open(path, "a", encoding="utf-8")


@contextlib.contextmanager
def folder_lock(out_dir: Path) -> Iterator[None]:
    """An exclusive lock on the output folder (held briefly: to check it, and to merge into it)."""
    with exclusive_lock(out_dir / LOCK):
        yield


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


COMPARED = ("task", "source", "weights", "settings")  # what must match for a folder to be continued


def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    for key in COMPARED:
        if old.get(key) != new.get(key):
            return {"task": "another task", "source": "another source folder", "weights": "other weights",
                    "settings": "other settings"}[key]
    return "another run"


def claim_folder(out_dir: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """Checks (or writes) ``run.json``: a folder holds the outputs of one run, never a mix."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)
    with folder_lock(out_dir):
        path = out_dir / MANIFEST
        old = None
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                old = {}
        has_outputs = bool(_logs(out_dir))
        differs = old is not None and any(old.get(k) != manifest.get(k) for k in COMPARED)
        if differs and has_outputs:
            if not overwrite:
                raise VisionError(
                    f"{out_dir}: holds predictions of {_describe_difference(old, manifest)} ({path}); "
                    "give --overwrite to replace them, or another --out"
                )
            clear_outputs(out_dir)
        elif old is None and has_outputs and not overwrite:
            raise VisionError(
                f"{out_dir}: holds predictions with no {MANIFEST} to say what made them; "
                "give --overwrite to replace them, or another --out"
            )
        elif old is None and has_outputs:
            clear_outputs(out_dir)
        with atomic_write(path, "w") as f:
            f.write(json.dumps(manifest, indent=1))


def clear_outputs(out_dir: Path) -> None:
    """Removes what a prediction run writes into ``out_dir`` (and nothing else)."""
    for p in _logs(out_dir):
        p.unlink()
    for name in ("predictions.json", "images.json", "predictions.csv", SKIPPED, MANIFEST):
        with contextlib.suppress(FileNotFoundError):
            (out_dir / name).unlink()
    for sub in ("masks", "images"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)


# Running --------------------------------------------------------------------------------------------


def run_folder(
    predictor: Predicts,
    paths: Sequence[str],
    out_dir: str | os.PathLike,
    writer: Writer,
    *,
    root: Path | None = None,
    manifest: dict[str, Any] | None = None,
    overwrite: bool = False,
    shard: tuple[int, int] = (0, 1),
    batch_size: int = 2,
    num_workers: int = 2,
    preprocess: Callable[[np.ndarray], torch.Tensor] | None = None,
    progress: bool = True,
) -> RunSummary:
    """Predicts every path not done in ``out_dir`` (this process's share of them), then merges.

    Under ``torchrun`` the returned summary is the whole world's; with ``shard=(k, n)`` it is this
    process's, and the outputs hold what every process has finished so far.
    """
    from tqdm import tqdm

    info = du.dist_info()
    out_dir = Path(out_dir)
    k, n = shard
    if not (n >= 1 and 0 <= k < n):
        raise VisionError(f"shard {k}/{n}: expected K/N with 0 <= K < N")
    if info.is_main:
        claim_folder(out_dir, manifest or {}, overwrite)
    du.barrier()
    # Rank 0 reads what is done and tells the others, so every rank shards the very same list.
    done = du.broadcast_object(done_names(out_dir) if info.is_main else None)
    names = [relative_name(p, root) for p in paths]
    first: dict[str, int] = {}
    for i, name in enumerate(names):  # a file listed twice is predicted once
        first.setdefault(name, i)
    # A shard is a fixed share of the whole list (not of what is left, which changes as the other shards
    # finish images); what is done is then skipped, and torchrun's ranks split the rest.
    share = list(first.values())[k::n]
    todo = [i for i in share if names[i] not in done]
    summary = RunSummary(resumed=len(share) - len(todo))
    mine = todo[info.rank :: info.world_size]
    log_path = out_dir / f"predictions.partial.{_log_tag()}.jsonl"
    with _open_for_append(log_path) as partial, tqdm(
        total=len(mine), desc="predict", unit="img", disable=not progress or not info.is_main, dynamic_ncols=True
    ) as bar:
        for j, img, size, pred, err in iter_predictions(
            predictor, [paths[i] for i in mine], batch_size=batch_size, num_workers=num_workers, preprocess=preprocess
        ):
            name = names[mine[j]]
            if err is not None:
                summary.skipped.append(err)
                log.warning("skipping unreadable image: %s", err)
                partial.write(json.dumps({"image": {"file_name": name}, "skipped": err}) + "\n")
            else:
                entry = writer.entry(name, img, size, pred)
                summary.done += 1
                summary.counted += writer.count(entry)
                partial.write(json.dumps({"image": {"file_name": name, "width": size[1], "height": size[0]},
                                          **entry}) + "\n")
            partial.flush()
            bar.update(1)
    if info.enabled:
        parts = du.all_gather_object(summary)
        summary = RunSummary(
            done=sum(s.done for s in parts), resumed=summary.resumed,
            skipped=sorted(e for s in parts for e in s.skipped), counted=sum(s.counted for s in parts),
        )
    if info.is_main:
        merge_outputs(out_dir, writer)
    du.barrier()
    return summary


def _previous_ids(out_dir: Path) -> dict[str, int]:
    try:
        listed = json.loads((out_dir / "images.json").read_text())
        return {str(im["file_name"]): int(im["id"]) for im in listed.get("images", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def merge_outputs(out_dir: Path, writer: Writer) -> None:
    """The task's outputs from every process's log, each image once; ids stable across merges.

    Two passes over the logs keep memory to the images list: the first finds each image's first entry,
    the second streams those entries to the writer.
    """
    out_dir = Path(out_dir)
    with folder_lock(out_dir):
        logs = _logs(out_dir)
        chosen: dict[str, tuple[int, int]] = {}  # name -> (log, entry number)
        sizes: dict[str, tuple[int, int]] = {}
        failed: dict[str, str] = {}
        for li, path in enumerate(logs):
            for ei, entry in enumerate(_iter_log(path)):
                name = entry["image"]["file_name"]
                if "skipped" in entry:
                    failed.setdefault(name, str(entry["skipped"]))
                elif name not in chosen:
                    chosen[name] = (li, ei)
                    sizes[name] = (int(entry["image"].get("width", 0)), int(entry["image"].get("height", 0)))
        ids = {name: i for name, i in _previous_ids(out_dir).items() if name in chosen}
        next_id = max(ids.values(), default=0) + 1
        for name in sorted(chosen):
            if name not in ids:
                ids[name] = next_id
                next_id += 1
        images = sorted(
            ({"id": ids[name], "file_name": name, "width": w, "height": h} for name, (w, h) in sizes.items()),
            key=lambda im: im["id"],
        )

        def entries() -> Iterator[dict[str, Any]]:
            wanted = {pos: name for name, pos in chosen.items()}
            for li, path in enumerate(logs):
                for ei, entry in enumerate(_iter_log(path)):
                    name = wanted.get((li, ei))
                    if name is not None:
                        entry["image"]["id"] = ids[name]
                        yield entry

        writer.finish(out_dir, images, entries())
        skipped = [{"file_name": name, "error": err} for name, err in sorted(failed.items()) if name not in chosen]
        with atomic_write(out_dir / SKIPPED, "w") as f:
            f.write(json.dumps(skipped, indent=1))
