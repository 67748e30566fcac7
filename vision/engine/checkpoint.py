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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vision.config import config_to_dict
from vision.engine.optim import schedule_of
from vision.engine.seeding import seed_everything
from vision.errors import DataError
from vision.models.weights import read_checkpoint_file, save_checkpoint
from vision.runtime.logging import console

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


@dataclass
class Position:
    """Where a run is; saved in every checkpoint."""

    epoch: int = 0  # the epoch being trained (0-based)
    batch: int = 0  # batches of this epoch consumed on each rank
    iteration: int = 0  # optimizer steps taken (skipped ones included)
    best_score: float = float("-inf")  # the task's metric at best.pt (the first evaluation always improves)
    best_iteration: int = -1
    elapsed_s: float = 0.0  # training wall time before this process started


# A trainer's state (``trainer`` is a ``vision.engine.trainer.Trainer``) ---------------------------------------


def inference_state(trainer: Any) -> dict[str, Any]:
    """What inference and fine-tuning need (``best.pt``): weights, config, categories, metrics.

    The categories keep the data set's own ids beside the names, so predictions leave with the
    ids of the user's annotation files (COCO's 1..90 with gaps, a Roboflow export's 0 placeholder).
    """
    ckpt: dict[str, Any] = {
        "model": trainer.eval_model().state_dict(),
        "config": config_to_dict(trainer.cfg),
        "class_names": trainer.class_names,
        "categories": {"ids": [int(i) for i in trainer.categories.ids], "names": list(trainer.categories.names)},
        "arch": trainer.cfg.model.arch,
        "iteration": trainer.pos.iteration,
        "version": CHECKPOINT_VERSION,
    }
    if trainer.last_metrics is not None:
        # plain numbers, lists and dicts only (weights_only loading); the printed tables stay out
        ckpt["metrics"] = {k: v for k, v in trainer.last_metrics.items() if k != "summary"}
    return ckpt


def training_state(trainer: Any, rng: list[dict[str, Any]]) -> dict[str, Any]:
    """``last.pt``: the inference checkpoint plus everything resuming needs."""
    ckpt: dict[str, Any] = {
        **inference_state(trainer),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "state": {
            **asdict(trainer.pos), "elapsed_s": trainer._elapsed(), "world_size": trainer.dist.world_size,
            "planned_iters": trainer.planned_iters,
        },
        "rng": rng,
    }
    if trainer.ema is not None:
        ckpt["model_raw"] = trainer.model.state_dict()
    if trainer.scaler.is_enabled():
        ckpt["scaler"] = trainer.scaler.state_dict()
    return ckpt


def restore(trainer: Any, path: str | Path) -> None:
    """Restores everything ``save`` wrote; the next step is the one the saved run would have taken."""
    ckpt = load_checkpoint_file(path)
    if "optimizer" not in ckpt or "state" not in ckpt:
        raise DataError(path, "not a training checkpoint (no optimizer state); use it as --weights instead")
    try:
        trainer.model.load_state_dict(ckpt.get("model_raw", ckpt["model"]))
        if trainer.ema is not None:
            trainer.ema.module.load_state_dict(ckpt["model"] if "model_raw" in ckpt else trainer.model.state_dict())
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise DataError(path, f"does not fit this config's model ({str(e).splitlines()[0][:200]})") from None
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    saved_plan = ckpt["state"].get("planned_iters", trainer.planned_iters)
    if saved_plan != trainer.planned_iters:  # epochs / max_iters changed: the schedule follows the config
        schedule_of(trainer.scheduler).total_iters = trainer.planned_iters
        if trainer.dist.is_main:
            console(f"schedule horizon: {saved_plan} -> {trainer.planned_iters} iterations (config changed)")
    if trainer.scaler.is_enabled() and "scaler" in ckpt:
        trainer.scaler.load_state_dict(ckpt["scaler"])
    state = dict(ckpt["state"])
    saved_world = int(state.pop("world_size", 1))
    state.pop("planned_iters", None)
    if "best_ap" in state:  # checkpoints written before the metric was named for any task
        state.setdefault("best_score", state.pop("best_ap"))
    trainer.pos = Position(**{k: v for k, v in state.items() if k in Position.__dataclass_fields__})
    rng = ckpt.get("rng") or []
    if saved_world == trainer.dist.world_size and len(rng) == trainer.dist.world_size:
        set_rng_state(rng[trainer.dist.rank])
    else:
        if trainer.dist.is_main:
            console(
                f"warning: {path} was written by {saved_world} process(es), this run has "
                f"{trainer.dist.world_size}: the data order continues, random draws will differ"
            )
        seed_everything(trainer.tcfg.seed + trainer.pos.iteration + trainer.dist.rank)
    if trainer.pos.batch and saved_world != trainer.dist.world_size:
        trainer.pos.batch = 0  # shares of an epoch differ with the world size: start the next epoch
        trainer.pos.epoch += 1
    trainer.last_metrics = ckpt.get("metrics")
    trainer.resumed_from = Path(path)
