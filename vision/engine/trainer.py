"""The training loop, driven by ``TrainConfig``, for any model that follows torchvision's convention
(``model(inputs, targets)`` returns a dict of losses in training mode).  What is trained on and how it
is scored come from the task (``vision.tasks``): the loop only knows "the task's metric".

One iteration is one optimizer step (``grad_accum`` batches).  What makes a run resumable bit-for-bit:

- the sampler's order is a pure function of ``(seed, epoch)`` and restarts at any draw
  (``set_epoch(epoch, start)``);
- every sample is drawn with random generators seeded from ``(seed, epoch, rank, position in the
  epoch)`` (``seeding.py``), so augmentation depends neither on the number of workers nor on where a
  run was resumed;
- checkpoints hold the optimizer, scheduler, scaler, EMA, data position and each rank's random
  generators, and are written only between optimizer steps.

The loop keeps losses on the device and reads them back only when it logs.  The one other host sync
is the finiteness check before each step: a non-finite loss (or gradient) skips the update with a
warning, and ``max_bad_steps`` in a row stop training, leaving the last good checkpoint in place.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, Dataset

from vision.atomic import remove_stale_temp_files
from vision.config import Config, save_config
from vision.data.loader import make_loader
from vision.engine.checkpoint import (
    Position,
    atomic_save,
    inference_state,
    restore,
    rng_state,
    training_state,
)
from vision.engine.optim import budget_horizon, build_optimizer, build_scheduler, schedule_of
from vision.engine.seeding import PositionedSampler, SeededSamples, seed_everything
from vision.errors import ConfigError, DataError, VisionError
from vision.metrics.summary import flat_metrics
from vision.models.layout import use_channels_last
from vision.runtime import distributed as du
from vision.runtime.device import (
    autocast,
    make_grad_scaler,
    select_device,
    to_device,
)
from vision.runtime.logging import MetricLogger, console, progress
from vision.runtime.precision import mixed_precision_usable

Hook = Callable[[str, "Trainer"], None]
Evaluator = Callable[[Any, dict[Any, dict[str, Any]]], dict[str, Any]]


class TrainingDiverged(VisionError):
    """The loss stayed non-finite for ``train.max_bad_steps`` steps in a row."""


class Trainer:
    """Trains ``model`` on ``train_dataset`` and evaluates on ``val_dataset`` / ``val_set``.

    The parts are passed in (``train()`` builds them from a config), so a test or a tool can swap
    any of them.  Call ``setup_runtime(cfg)`` before building the model.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        model: nn.Module,
        train_set: Any,
        train_dataset: Dataset,
        collate_fn: Callable,
        val_set: Any = None,
        val_dataset: Dataset | None = None,
        predict_fn: Callable[..., dict[Any, Any]] | None = None,
        evaluator: Evaluator | None = None,
        score_fn: Callable[[dict[str, Any] | None], float] | None = None,
        score_name: str = "score",
        sampler: Any = None,
        hooks: Sequence[Hook] = (),
    ):
        self.cfg = cfg
        self.tcfg = tcfg = cfg.train
        self.run_dir = Path(run_dir)
        self.device = select_device(tcfg.device)
        self.dist = du.init_distributed(self.device)
        self.hooks = list(hooks)
        self.train_set, self.val_set = train_set, val_set
        self.val_dataset = val_dataset
        self.categories = train_set.categories
        self.class_names = list(self.categories.names)
        self.evaluator = evaluator
        self.predict_fn = predict_fn
        self.score_fn = score_fn if score_fn is not None else _no_score
        self.score_name = score_name
        if val_set is not None and (predict_fn is None or evaluator is None):
            raise ValueError("evaluating a validation set needs the task's predict_fn and evaluator")
        if tcfg.grad_accum < 1:
            raise ConfigError(f"train.grad_accum must be >= 1, got {tcfg.grad_accum}")
        if cfg.data.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")

        self.model = model.to(self.device)
        if tcfg.channels_last:
            use_channels_last(self.model)
        # train.freeze: comma-separated parameter-name prefixes held fixed until epoch train.unfreeze_at
        # (parameters the model itself freezes, such as frozen stages, stay frozen)
        self.frozen_prefixes = tuple(p.strip() for p in (tcfg.freeze or "").split(",") if p.strip())
        self.frozen_names = tuple(
            n for n, p in self.model.named_parameters()
            if self.frozen_prefixes and n.startswith(self.frozen_prefixes) and p.requires_grad
        )
        self._set_frozen(True)
        later = self.frozen_names if tcfg.unfreeze_at is not None else ()
        self.optimizer = build_optimizer(self.model, tcfg, later)
        self.amp = mixed_precision_usable(self.device, tcfg.amp, self.dist.is_main)
        self.scaler = make_grad_scaler(self.device, self.amp)
        self.ema = self._make_ema() if tcfg.ema else None
        self.ddp_model = du.wrap_ddp(self.model, self.device)

        if sampler is None:
            sampler = self._default_sampler()
        self.positions = PositionedSampler(sampler)
        self.loader = make_loader(
            SeededSamples(train_dataset, tcfg.seed, self.dist.rank),
            BatchSampler(self.positions, cfg.data.batch_size, drop_last=False),
            cfg.data.num_workers,
            self.device,
            tcfg.seed,
            collate_fn,
        )
        self.batches_per_epoch = math.ceil(self.positions.epoch_len / cfg.data.batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(train_set.source or "training set", "no training images")
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / tcfg.grad_accum)
        self.planned_iters = (
            tcfg.max_iters if tcfg.max_iters is not None else max(1, tcfg.epochs) * self.steps_per_epoch
        )
        self.scheduler = build_scheduler(self.optimizer, tcfg, self.planned_iters)
        if self.dist.enabled:  # same initial weights everywhere; from here each rank draws its own numbers
            seed_everything(tcfg.seed + 1000003 * self.dist.rank)
        self.pos = Position()
        self.bad_steps = 0
        self.last_metrics: dict[str, Any] | None = None
        self.resumed_from: Path | None = None
        self._last_eval_iter = -1
        self._group_loss = torch.zeros((), device=self.device)
        self._log_sums: dict[str, torch.Tensor] = {}
        self._log_count = 0  # optimizer steps since the last log
        self._log_batches = 0  # batches since the last log (losses are averaged per batch)
        self._log_images = 0
        self._log_time = time.monotonic()
        self._start_iter = 0
        self._start_time = time.monotonic()
        self._elapsed_base = 0.0
        self._eval_seconds = 0.0  # how long the last evaluation took
        self.logger: MetricLogger | None = None

    # parts ----------------------------------------------------------------------------------------

    def _default_sampler(self) -> Any:
        from vision.data.samplers import build_sampler

        d = self.cfg.data
        return build_sampler(
            d.sampler, self.train_set.labels_per_image(), num_replicas=self.dist.world_size,
            rank=self.dist.rank, seed=self.tcfg.seed, shuffle=True, epoch_length=d.epoch_length,
            class_cap=d.class_cap, class_power=d.class_power, repeat_threshold=d.repeat_threshold,
        )

    def _make_ema(self) -> nn.Module:
        from timm.utils import ModelEmaV3

        return ModelEmaV3(self.model, decay=self.tcfg.ema_decay, use_warmup=self.tcfg.ema_warmup)

    def _set_frozen(self, frozen: bool) -> None:
        names = set(self.frozen_names)
        for name, param in self.model.named_parameters():
            if name in names:
                param.requires_grad_(not frozen)

    def _maybe_unfreeze(self) -> None:
        at = self.tcfg.unfreeze_at
        if not self.frozen_names or at is None or self.pos.epoch < at:
            return
        params = dict(self.model.named_parameters())
        if all(params[n].requires_grad for n in self.frozen_names):
            return
        self._set_frozen(False)
        self.ddp_model = du.wrap_ddp(self.model, self.device)  # DDP fixes its parameter set at wrap time
        if self.dist.is_main:
            console(f"epoch {self.pos.epoch}: unfroze {', '.join(self.frozen_prefixes)}")

    @property
    def total_iters(self) -> int:
        return schedule_of(self.scheduler).total_iters

    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and exported: the EMA when it is on."""
        return self.ema.module if self.ema is not None else self.model

    def _hook(self, event: str) -> None:
        for hook in self.hooks:
            hook(event, self)

    # checkpoints ----------------------------------------------------------------------------------

    def inference_checkpoint(self) -> dict[str, Any]:
        """What ``best.pt`` holds: weights, config, categories, metrics (``checkpoint.inference_state``)."""
        return inference_state(self)

    def checkpoint(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        """What ``last.pt`` holds: the inference checkpoint plus everything resuming needs."""
        return training_state(self, rng)

    def save(self, best: bool = False) -> None:
        """Writes ``last.pt`` (and ``best.pt``); a collective call, rank 0 writes."""
        rng = du.all_gather_object(rng_state())
        if self.dist.is_main:
            last = self.run_dir / "last.pt"
            atomic_save(self.checkpoint(rng), last)
            if best:  # no optimizer state: a third of last.pt's size, and never mistaken for a resume point
                atomic_save(self.inference_checkpoint(), self.run_dir / "best.pt")
        self._hook("checkpoint")

    def resume(self, path: str | Path) -> None:
        """Restores everything ``save`` wrote; the next step is the one the saved run would have taken."""
        restore(self, path)

    # the loop -------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Trains to the end of the schedule; returns a summary (also on every rank)."""
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.run_dir)  # checkpoints half-written by a killed run
            save_config(self.cfg, self.run_dir / "config.yaml")
        self.logger = MetricLogger(
            self.run_dir, main, resume_iter=self.pos.iteration if self.resumed_from else None
        )
        self._start_iter = self.pos.iteration
        self._start_time = time.monotonic()
        self._elapsed_base = self.pos.elapsed_s
        self._log_time = self._start_time
        stopped_early = False
        try:
            self._hook("start")
            while self.pos.iteration < self.total_iters:
                self._maybe_unfreeze()
                finished_epoch = self._train_epoch()
                if not finished_epoch:
                    break
                self.pos.epoch += 1
                self.pos.batch = 0
                every = self.tcfg.eval_every
                if not self.bad_steps:  # in a streak of non-finite losses the last good checkpoint stays
                    self.save()  # before evaluating: an evaluation that fails cannot lose the epoch
                if every > 0 and self.pos.epoch % every == 0 and self._evaluate() and not self.bad_steps:
                    self.save(best=True)
                self._hook("epoch")
            if self._last_eval_iter != self.pos.iteration:
                self.save()
                self.save(best=self._evaluate())
        except TrainingDiverged:
            stopped_early = True
            raise
        finally:
            self.logger.close()
            if not stopped_early:
                self._hook("end")
        return self.summary()

    def _elapsed(self) -> float:
        """Training wall time of the whole run, resumed parts included."""
        return self._elapsed_base + (time.monotonic() - self._start_time)

    def _train_epoch(self) -> bool:
        """Trains from the current position to the end of the epoch; False when the schedule ended."""
        A, B = self.tcfg.grad_accum, self.batches_per_epoch
        bs = self.cfg.data.batch_size
        self.positions.set_epoch(self.pos.epoch, self.pos.batch * bs)
        self.model.train()
        bar = progress(
            self.steps_per_epoch, self.pos.batch // A, f"epoch {self.pos.epoch + 1}", self.dist.is_main
        )
        self._bar = bar
        try:
            for images, targets in self.loader:
                if self.pos.batch >= B:
                    break
                b = self.pos.batch
                group_start = (b // A) * A
                group_size = min(A, B - group_start)
                last_in_group = b - group_start == group_size - 1
                self._forward_backward(images, targets, group_size, last_in_group)
                self.pos.batch += 1
                if last_in_group:
                    self._optimizer_step()
                    bar.update(1)
                    if self.pos.iteration >= self.total_iters:
                        return self.pos.batch >= B
                    every = self.tcfg.ckpt_every_iters
                    if every and self.pos.iteration % every == 0 and self.pos.batch < B and not self.bad_steps:
                        self.save()
            self.pos.batch = B
            return True
        finally:
            bar.close()

    def _forward_backward(self, images: list, targets: list, group_size: int, sync: bool) -> None:
        images, targets = to_device(images, targets, self.device)
        no_sync = getattr(self.ddp_model, "no_sync", None)
        ctx = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        with ctx:
            with autocast(self.device, self.amp):
                losses = self.ddp_model(images, targets)
            loss = sum(v.float() for v in losses.values())
            self.scaler.scale(loss / group_size).backward()
        self._group_loss += loss.detach()
        for k, v in losses.items():
            acc = self._log_sums.get(k)
            v = v.detach().float()
            self._log_sums[k] = v if acc is None else acc + v
        self._log_images += len(images)
        self._log_batches += 1

    def _optimizer_step(self) -> None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        grad_norm = (
            torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros((), device=self.device)
        )
        ok = torch.isfinite(self._group_loss)
        if not self.scaler.is_enabled():  # with a scaler, overflowing gradients are its business
            ok = ok & torch.isfinite(grad_norm)
        ok = bool(du.all_true(ok))  # the step's one host sync
        stepped = False
        if ok:
            if self.tcfg.clip_grad:
                torch.nn.utils.clip_grads_with_norm_(params, self.tcfg.clip_grad, grad_norm)
            if self.scaler.is_enabled():
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            stepped = True
            self.bad_steps = 0
            acc = self._log_sums.get("grad_norm")
            self._log_sums["grad_norm"] = grad_norm.detach() if acc is None else acc + grad_norm.detach()
        else:
            self.bad_steps += 1
        if self.scaler.is_enabled():
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.pos.iteration += 1
        if stepped and self.ema is not None:
            self.ema.update(self.model, step=self.pos.iteration)
        self._group_loss = torch.zeros((), device=self.device)
        self._log_count += 1
        if not ok:
            self._on_bad_step()
        self._hook("step")
        if self.pos.iteration % max(1, self.tcfg.log_every) == 0:
            self._log_train()

    def _on_bad_step(self) -> None:
        limit = self.tcfg.max_bad_steps
        if self.dist.is_main:
            console(
                f"warning: iteration {self.pos.iteration}: loss or gradient is not finite; "
                f"update skipped ({self.bad_steps}/{limit} in a row)"
            )
        if self.logger is not None:
            self.logger.log("skip", self.pos.iteration, {"bad_steps": self.bad_steps})
        if self.bad_steps >= limit:
            last = self.run_dir / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"training stopped at iteration {self.pos.iteration}: the loss was not finite for "
                f"{self.bad_steps} steps in a row (lower train.lr, set train.clip_grad, or check the data); "
                f"{kept}"
            )

    def _log_train(self) -> None:
        now = time.monotonic()
        keys = sorted(self._log_sums)
        values: dict[str, float] = {}
        if keys and self._log_count:
            counts = [self._log_count if k == "grad_norm" else max(1, self._log_batches) for k in keys]
            vec = torch.stack([self._log_sums[k].reshape(()) for k in keys])
            vec = du.all_reduce_mean(vec / torch.tensor(counts, dtype=vec.dtype, device=vec.device))
            values = dict(zip(keys, vec.tolist()))  # the logging-time host sync
        loss_keys = [k for k in keys if k != "grad_norm"]
        values["loss"] = sum(values[k] for k in loss_keys) if loss_keys else float("nan")
        dt = max(now - self._log_time, 1e-9)
        values["images_per_s"] = self._log_images * self.dist.world_size / dt
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        self._update_horizon()
        if self.logger is not None:
            self.logger.log("train", self.pos.iteration, values, epoch=self.pos.epoch)
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}", refresh=False)
        self._log_sums, self._log_count, self._log_batches, self._log_images = {}, 0, 0, 0
        self._log_time = now

    def _update_horizon(self) -> None:
        """With ``time_budget_min``, the cosine horizon is where the measured speed ends the budget."""
        budget = self.tcfg.time_budget_min
        if budget is None:
            return
        horizon = budget_horizon(
            budget * 60.0, self.pos.iteration, self.pos.iteration - self._start_iter,
            time.monotonic() - self._start_time, self._elapsed() + self._eval_seconds, self.planned_iters,
            self.total_iters,
        )
        schedule_of(self.scheduler).total_iters = max(1, int(du.broadcast_object(horizon)))

    def _evaluate(self) -> bool:
        """Evaluates the eval weights; returns whether the task's metric improved on the best so far.

        The checkpoint of the weights evaluated is already written, so a failing evaluation (a bad
        validation annotation, say) ends training with one line that says where the work is."""
        try:
            return self._evaluate_now()
        except (KeyboardInterrupt, TrainingDiverged):
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            last = self.run_dir / "last.pt"
            raise VisionError(
                f"evaluation at iteration {self.pos.iteration} failed ({type(e).__name__}: {first}); "
                f"the trained weights are in {last}"
            ) from e

    def _evaluate_now(self) -> bool:
        self._last_eval_iter = self.pos.iteration
        t0 = time.monotonic()
        if self.val_set is None or self.val_dataset is None or len(self.val_set) == 0:
            return False
        preds = self.predict_fn(
            self.eval_model(), self.val_dataset, self.val_set, self.device,
            batch_size=self.cfg.data.batch_size, num_workers=self.cfg.data.num_workers, amp=self.amp,
        )
        metrics = self.evaluator(self.val_set, preds) if self.dist.is_main else None
        metrics = du.broadcast_object(metrics)
        self.last_metrics = metrics
        score = self.score_fn(metrics)
        improved = math.isfinite(score) and score > self.pos.best_score
        if improved:
            self.pos.best_score, self.pos.best_iteration = score, self.pos.iteration
        if self.dist.is_main:
            flat = flat_metrics(metrics)
            if self.logger is not None:
                self.logger.log("eval", self.pos.iteration, flat, epoch=self.pos.epoch)
            console(
                f"epoch {self.pos.epoch} iter {self.pos.iteration}: {self.score_name} {score:.4f} "
                f"(best {self.pos.best_score:.4f})"
            )
        self.model.train()
        self._eval_seconds = time.monotonic() - t0
        self._log_time += self._eval_seconds  # throughput excludes evaluation (images since the last log stay counted)
        return improved

    def summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "iterations": self.pos.iteration,
            "epochs": self.pos.epoch + self.pos.batch / self.batches_per_epoch,
            "seconds": round(self._elapsed(), 1),
            "score": self.score_fn(self.last_metrics),
            "skipped_images": sorted(
                {*getattr(self.train_set, "skipped_images", []), *getattr(self.val_set, "skipped_images", [])}
            ),
            "score_name": self.score_name,
            "best_score": self.pos.best_score if self.pos.best_iteration >= 0 else None,
            "best_iteration": self.pos.best_iteration,
            "metrics": self.last_metrics,
        }


def _no_score(metrics: dict[str, Any] | None) -> float:
    return float("nan")
