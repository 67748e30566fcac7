"""A training run from a config: the task's data sets and scoring, its model, the trainer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vision.config import Config
from vision.engine.seeding import setup_runtime
from vision.engine.trainer import Hook, Trainer


def build_trainer(cfg: Config, run_dir: str | Path, hooks: Sequence[Hook] = ()) -> Trainer:
    """Data sets, model and trainer from a config (``model.num_classes`` is filled in from the data)."""
    setup_runtime(cfg)
    from vision.models import build_model
    from vision.tasks import task_for

    task = task_for(cfg)
    data = task.training_data()
    model = build_model(cfg.model)
    if cfg.model.init_from:  # fine-tuning: every weight of a same-arch checkpoint, class layers re-created
        from vision.models.weights import load_model_weights

        load_model_weights(model, cfg.model.init_from)
    return Trainer(
        cfg, run_dir, model=model, train_set=data.train_set, train_dataset=data.train_dataset,
        collate_fn=task.collate, val_set=data.val_set, val_dataset=data.val_dataset,
        predict_fn=task.predict_dataset, evaluator=task.evaluate, score_fn=task.score, score_name=task.metric,
        hooks=hooks,
    )


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.output_dir) / cfg.name


def train(
    cfg: Config, run_dir: str | Path | None = None, resume: str | Path | None = None, hooks: Sequence[Hook] = ()
) -> dict[str, Any]:
    """``vision train`` without the command line: build, optionally resume, fit, draw the curves (rank 0,
    ``curves.png`` in the run folder); returns the summary."""
    from vision.engine.checkpoint import resolve_resume
    from vision.runtime.distributed import dist_info

    run_dir = Path(run_dir) if run_dir is not None else run_dir_of(cfg)
    trainer = build_trainer(cfg, run_dir, hooks)
    if resume is not None:
        trainer.resume(resolve_resume(resume, run_dir))
    summary = trainer.fit()
    if dist_info().is_main and (run_dir / "metrics.jsonl").exists():
        from vision.metrics.plots import plot_training_curves

        summary["curves"] = str(plot_training_curves(run_dir / "metrics.jsonl", run_dir / "curves.png"))
    return summary
