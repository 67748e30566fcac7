"""Optimizer and learning-rate schedule.

The schedule is per iteration (one iteration = one optimizer step), because detection recipes are
stated in iterations and a per-epoch schedule would make the warm-up depend on the data set size.  It
is a ``torch.optim.lr_scheduler.LambdaLR`` whose lambda is a ``WarmupSchedule`` object: LambdaLR saves
a callable object's attributes in its ``state_dict``, so the horizon (which a wall-clock budget moves
while training) comes back on resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from vision.config import TrainConfig
from vision.errors import ConfigError


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases and other 1-d parameters (scales, embeddings' gains) take no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(
    model: nn.Module, weight_decay: float, trainable_later: Iterable[str] = ()
) -> list[dict[str, object]]:
    """Decay / no-decay groups.

    Like ``timm.optim.param_groups_weight_decay``, but parameters frozen now and unfrozen later
    (``trainable_later``: their names) are kept in the optimizer, so unfreezing needs no new optimizer
    and a resumed run has the same parameter groups as the original one.
    """
    later = set(trainable_later)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad and name not in later:
            continue
        (no_decay if _no_decay(name, param) else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def backbone_stage_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Parameter name -> stage index (stem 0, then each stage) for the timm backbone inside ``model``.

    The stages are timm's own coarse grouping (``group_matcher(coarse=True)`` of the full model the
    feature network was made from, as ``timm.models.group_parameters`` applies it); feature networks that
    flatten child names (``stages_0``) are matched to the full model's (``stages.0``).  The second value
    is the number of layers: the stages plus one for everything outside the backbone (FPN, heads).
    """
    import timm
    from timm.models import group_parameters

    from vision.models.backbone import _source_candidates

    for prefix, module in model.named_modules():
        arch = _timm_architecture(module)
        if arch is None:
            continue
        with torch.device("meta"):
            full = timm.create_model(arch, pretrained=False)
        if not hasattr(full, "group_matcher"):
            continue
        full_ids = group_parameters(full, full.group_matcher(coarse=True), reverse=True)
        head_id = max(full_ids.values())
        ids: dict[str, int] = {}
        for name, _ in module.named_parameters():
            found = next((full_ids[c] for c in _source_candidates(name) if c in full_ids), None)
            if found is not None and found < head_id:
                ids[f"{prefix}.{name}" if prefix else name] = found
        if ids:
            return ids, head_id + 1
    raise ConfigError("train.layer_decay: found no timm backbone with stage groups in the model")


def _timm_architecture(module: nn.Module) -> str | None:
    if not hasattr(module, "feature_info"):
        return None
    cfg = getattr(module, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else getattr(cfg, "architecture", None)
    return arch if isinstance(arch, str) else None


class _StageGrouped:
    """``model`` as timm's ``param_groups_layer_decay`` sees it: its parameters and a stage matcher."""

    def __init__(self, model: nn.Module, ids: dict[str, int], layer_max: int):
        self.model, self.ids, self.layer_max = model, ids, layer_max

    def named_parameters(self):
        return self.model.named_parameters()

    def group_matcher(self, coarse: bool = False):
        return lambda name: self.ids.get(name, self.layer_max)


def layer_decay_groups(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float, trainable_later: Iterable[str] = ()
) -> list[dict[str, object]]:
    """timm's ``param_groups_layer_decay`` over the backbone's stages: the parameters of the stage k
    layers below the top (the FPN / head) learn at ``lr * layer_decay ** k``.

    Parameters frozen now and unfrozen later (``trainable_later``) are placed in their groups too.
    """
    from timm.optim import param_groups_layer_decay

    if not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"train.layer_decay must be in (0, 1], got {layer_decay}")
    ids, num_layers = backbone_stage_ids(model)
    later = [p for n, p in model.named_parameters() if n in set(trainable_later) and not p.requires_grad]
    for p in later:
        p.requires_grad_(True)
    try:
        groups = param_groups_layer_decay(
            _StageGrouped(model, ids, num_layers - 1), weight_decay=weight_decay, layer_decay=layer_decay
        )
    finally:
        for p in later:
            p.requires_grad_(False)
    for g in groups:
        g["lr"] = lr * float(g["lr_scale"])
    return groups


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, trainable_later: Iterable[str] = ()
) -> torch.optim.Optimizer:
    trainable_later = tuple(trainable_later)
    if cfg.layer_decay is not None:
        groups = layer_decay_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay, trainable_later)
    else:
        groups = param_groups(model, cfg.weight_decay, trainable_later)
    if not groups:
        raise ConfigError("the model has no trainable parameters (check train.freeze / model.frozen_stages)")
    name = cfg.optimizer.lower()
    fused = fused_kernels_apply(groups)
    if name == "sgd":
        # fused SGD cannot start the momentum of parameters that get gradients only after its first step
        fused = fused if not trainable_later else None
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
    raise ConfigError(f"train.optimizer={cfg.optimizer!r}: expected sgd or adamw")


def fused_kernels_apply(groups: list[dict]) -> bool | None:
    """Whether the optimizer can step with its fused kernels: every parameter on one CPU or CUDA device.

    PyTorch's default on a CPU is a Python loop over the parameters; the fused kernel does the same
    update (SGD bit for bit, AdamW within float rounding) 2.4-3x faster, which is a tenth of a small
    model's training step.  Elsewhere (or with mixed devices) the default stays.
    """
    devices = {p.device for g in groups for p in g["params"]}
    if len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda"):
        return True
    return None


class WarmupSchedule:
    """lr factor at iteration ``it``: linear warm-up from ``warmup_factor`` times the main schedule.

    Main schedules over ``total_iters``: ``cosine`` (half a cosine from 1 to 0), ``step`` (times
    ``gamma`` at each fraction in ``steps``), ``constant``.  The warm-up multiplies the main schedule,
    as in detectron2, so a short run with a long warm-up still decays.
    """

    def __init__(
        self,
        total_iters: int,
        schedule: str = "cosine",
        warmup_iters: int = 0,
        warmup_factor: float = 0.001,
        steps: Iterable[float] = (),
        gamma: float = 0.1,
    ) -> None:
        if schedule not in ("cosine", "step", "constant"):
            raise ConfigError(f"train.schedule={schedule!r}: expected cosine, step or constant")
        self.total_iters = max(1, int(total_iters))
        self.schedule = schedule
        self.warmup_iters = max(0, int(warmup_iters))
        self.warmup_factor = float(warmup_factor)
        self.steps = [float(s) for s in steps]
        self.gamma = float(gamma)

    def main(self, it: int) -> float:
        if self.schedule == "cosine":
            t = min(it, self.total_iters) / self.total_iters
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if self.schedule == "step":
            # A fraction <= 1 is a share of training; a larger value is an absolute iteration.
            milestones = [round(s * self.total_iters) if s <= 1 else int(s) for s in self.steps]
            return self.gamma ** sum(it >= m for m in milestones)
        return 1.0

    def warmup(self, it: int) -> float:
        if it >= self.warmup_iters:
            return 1.0
        alpha = it / self.warmup_iters
        return self.warmup_factor * (1.0 - alpha) + alpha

    def __call__(self, it: int) -> float:
        return self.main(it) * self.warmup(it)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = WarmupSchedule(
        total_iters, cfg.schedule, cfg.warmup_iters, cfg.warmup_factor, cfg.steps, cfg.gamma
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def schedule_of(scheduler: torch.optim.lr_scheduler.LambdaLR) -> WarmupSchedule:
    return scheduler.lr_lambdas[0]


def budget_horizon(
    budget_s: float, iteration: int, done_here: int, spent_here_s: float, spent_s: float, planned: int, current: int
) -> int:
    """The iteration a time budget ends at, from the speed measured in this process (``done_here`` steps
    in ``spent_here_s``): what is left of the budget after ``spent_s`` (training and the last evaluation,
    whose time is kept for the final one) at that speed, never past ``planned`` nor before now."""
    if done_here <= 0 or spent_here_s <= 0:
        return current
    estimate = iteration + max(0.0, budget_s - spent_s) * done_here / spent_here_s
    return max(iteration, min(planned, int(estimate)))
