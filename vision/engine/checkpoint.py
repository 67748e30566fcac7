"""Training checkpoints: written atomically, read back with ``weights_only=True``.

A training checkpoint is a vision checkpoint (``model``, ``config``, ``class_names``, ``arch``) plus all
that is needed to continue bit-for-bit: optimizer, scheduler, scaler, EMA, the position in the data
(epoch + batches consumed) and every random number generator.  ``model`` always holds the weights to
run inference with (the EMA when it is on); the raw training weights then travel as ``model_raw``.

Everything is stored as tensors, numbers, strings, lists and dicts, so loading never unpickles code.
A write goes to a temporary file in the same folder, is flushed to disk and then renamed over the
old file: a crash at any moment leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vision.errors import DataError
from vision.models.weights import read_checkpoint_file, save_checkpoint

CHECKPOINT_VERSION = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that either fully replaces ``path`` or leaves it untouched."""
    save_checkpoint(obj, path)


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint's dict; a damaged or foreign file is a one-line ``DataError``."""
    obj = read_checkpoint_file(path)
    if not isinstance(obj, dict):
        raise DataError(path, f"not a checkpoint (a {type(obj).__name__}, expected a dict)")
    return obj


def resolve_resume(spec: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """``--resume`` with no value -> ``<run>/last.pt``; a folder -> its ``last.pt``; a file -> itself."""
    path = Path(run_dir) / "last.pt" if spec in ("", "auto", None) else Path(spec)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise DataError(path, "no checkpoint to resume from")
    return path


# Random number generators --------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every generator the training loop draws from, as tensors and plain lists."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [int(version), [int(x) for x in mt], gauss],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in mt), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
