"""The Python API: load a checkpoint once, predict anything, train and evaluate from a notebook.

```python
import vision
model = vision.load("runs/bccd/best.pt")   # config, task and class names come from the checkpoint
results = model.predict("images/")          # path, folder, glob, list of paths, RGB numpy array, PIL image
r = results[0]
r.boxes, r.scores, r.labels, r.names, r.masks   # numpy; labels are the data set's category ids
r.to_coco(); r.draw()
run_dir = vision.train("configs/bccd_faster_rcnn.yaml", overrides=["train.lr=0.02"])
metrics = vision.evaluate("runs/bccd/best.pt")
```

The command line is a thin layer over this module: ``vision predict`` is ``load(...).predict_folder(...)``,
``vision train`` is ``train(...)`` and ``vision eval`` is ``evaluate(...)``, so both give the same numbers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vision.data.records import Categories
from vision.errors import VisionError
from vision.inference.engine import EngineOptions
from vision.inference.result import Result
from vision.inference.runner import RunSummary

Source = str | os.PathLike | np.ndarray | Any | Sequence[Any]


@dataclass
class PredictOptions:
    """How a model predicts: device, precision, engine, TTA and the fusion of several models."""

    device: str = "auto"
    precision: str | None = None  # fp32 | bf16 | fp16; None: fp32, or the amp choice
    amp: bool = False
    engine: EngineOptions = field(default_factory=EngineOptions)
    tta: bool = False
    tta_scales: tuple[float, ...] = (0.8, 1.0, 1.2)
    fusion: str = "wbf"
    iou: float | None = None
    skip_score: float = 0.0
    model_weights: tuple[float, ...] | None = None


class Model:
    """One model (or a fused ensemble of models of one task) ready to predict."""

    def __init__(self, loaded: Sequence[Any], options: PredictOptions):
        from vision.inference.ensemble import FusionSpec, predictor_of
        from vision.tasks import task_for

        self.loaded = list(loaded)
        first = self.loaded[0]
        self.cfg = first.cfg
        self.task = task_for(first.cfg)
        for other in self.loaded[1:]:
            if other.arch != first.arch and type(task_for(other.cfg)) is not type(self.task):
                raise VisionError(f"{first.source} and {other.source} are models of different tasks")
        if len(self.loaded) > 1 and self.task.name != "detection":
            raise VisionError(f"several models: ensembling is for detectors, {first.source} is a {self.task.name} model")
        self.options = options
        engine = replace(options.engine, precision=options.precision) if options.precision else options.engine
        self.spec = FusionSpec(options.fusion, options.iou, options.skip_score)
        self.predictor = predictor_of(
            self.loaded, device=options.device, amp=options.amp, tta=options.tta, tta_scales=options.tta_scales,
            spec=self.spec, model_weights=options.model_weights, engine=engine, whole_batches=self.task.whole_batches,
        )
        self._preprocess = self.task.preprocess()

    @property
    def categories(self) -> Categories:
        return self.loaded[0].categories

    @property
    def names(self) -> list[str]:
        """The class names, in label order."""
        return list(self.categories.names)

    def __repr__(self) -> str:
        sources = ", ".join(m.source for m in self.loaded)
        return f"Model({self.task.name}, {self.cfg.model.arch} on {self.cfg.model.backbone}, {len(self.names)} classes: {sources})"

    # in memory ---------------------------------------------------------------------------------------

    def predict(
        self, source: Source, *, batch_size: int = 2, workers: int = 2, stream: bool = False, keep_images: bool = True
    ) -> list[Result] | Iterator[Result]:
        """Predictions for a path, folder, glob, list file, list of paths, RGB numpy array, PIL image or a
        list of arrays / images; one ``Result`` per image, in order.  Unreadable files are skipped with a
        warning.  ``stream=True`` returns an iterator instead of a list (memory stays flat over a large
        folder); ``keep_images=False`` drops the pixels ``Result.draw`` needs."""
        results = self._iter(source, batch_size=batch_size, workers=workers, keep_images=keep_images)
        return results if stream else list(results)

    __call__ = predict

    def _iter(self, source: Source, *, batch_size: int, workers: int, keep_images: bool) -> Iterator[Result]:
        arrays = _as_arrays(source)
        if arrays is not None:
            yield from self._predict_arrays(arrays, batch_size, keep_images)
            return
        import logging

        from vision.data.image_io import list_images
        from vision.inference.runner import iter_predictions

        paths = [str(p) for p in source] if isinstance(source, (list, tuple)) else list_images(source)
        if not paths:
            raise VisionError(f"{source}: no images found")
        for i, img, size, pred, err in iter_predictions(
            self.predictor, paths, batch_size=batch_size, num_workers=workers, preprocess=self._preprocess,
            keep_original=keep_images,
        ):
            if err is not None:
                logging.getLogger(__name__).warning("skipping unreadable image: %s", err)
                continue
            image = img.permute(1, 2, 0).numpy() if keep_images and img is not None else None
            yield self.task.result(pred, self.categories, paths[i], size, image)

    def _predict_arrays(self, arrays: list[np.ndarray], batch_size: int, keep_images: bool) -> Iterator[Result]:
        for start in range(0, len(arrays), max(1, batch_size)):
            chunk = arrays[start : start + batch_size]
            if self._preprocess is not None:
                inputs = [self._preprocess(a) for a in chunk]
            else:
                inputs = [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1) for a in chunk]
            for a, pred in zip(chunk, self.predictor.predict(inputs)):
                yield self.task.result(pred, self.categories, None, (a.shape[0], a.shape[1]), a if keep_images else None)

    # into a folder -----------------------------------------------------------------------------------

    def predict_folder(
        self,
        source: str | os.PathLike,
        out: str | os.PathLike,
        *,
        batch_size: int = 2,
        workers: int = 2,
        save_images: bool = False,
        draw_thresh: float | None = None,
        write_csv: bool = False,
        hierarchy: str | os.PathLike | None = None,
        hierarchy_merge: str | None = "nms",
        overwrite: bool = False,
        shard: tuple[int, int] = (0, 1),
        progress: bool = True,
    ) -> tuple[RunSummary, list[Path]]:
        """``vision predict``: the task's output files for every image of ``source`` in ``out``, resumable,
        sharded under ``torchrun`` (or by ``shard=(k, n)``); returns the summary and the files written."""
        from vision.data.image_io import list_images
        from vision.inference.runner import run_folder, source_root
        from vision.tasks.base import WriterOptions

        paths = list_images(source)
        if not paths:
            raise VisionError(f"{source}: no images found")
        out = Path(out)
        options = WriterOptions(
            save_images=save_images, draw_thresh=draw_thresh,
            write_csv=write_csv,
        )
        if hierarchy is not None:
            from vision.ensemble import load_hierarchy
            from vision.inference.predictor import hierarchy_expander

            options.expand, options.categories_out = hierarchy_expander(
                load_hierarchy(hierarchy), self.categories, hierarchy_merge
            )
        writer = self.task.writer(out, self.categories, options)
        root = source_root(source, paths)
        summary = run_folder(
            self.predictor, paths, out, writer, root=root, manifest=self.manifest(root, hierarchy, hierarchy_merge),
            overwrite=overwrite, shard=shard, batch_size=batch_size, num_workers=workers,
            preprocess=self._preprocess, progress=progress,
        )
        return summary, [out / name for name in writer.outputs]

    def manifest(self, root: Path | None, hierarchy: Any = None, hierarchy_merge: Any = None) -> dict[str, Any]:
        """What a folder of this model's predictions records about how they were made (``run.json``)."""
        from dataclasses import asdict

        from vision.config import config_to_dict
        from vision.inference.runner import file_digest

        o = self.options
        settings: dict[str, Any] = {
            "models": [config_to_dict(m.cfg)["model"] for m in self.loaded],
            "precision": getattr(getattr(self.predictor, "engine", None), "precision", o.precision or "fp32"),
            "amp": o.amp,
        }
        if self.task.name == "detection":
            settings.update(tta=o.tta, tta_scales=list(o.tta_scales) if o.tta else None, fusion=asdict(self.spec),
                            model_weights=list(o.model_weights) if o.model_weights else None,
                            hierarchy=file_digest(hierarchy) if hierarchy else None,
                            hierarchy_merge=hierarchy_merge if hierarchy else None)
        return {
            "task": self.task.name,
            "source": str(root) if root is not None else None,
            "weights": [file_digest(m.source) for m in self.loaded],
            "weights_files": [m.source for m in self.loaded],
            "settings": settings,
        }


def _as_arrays(source: Source) -> list[np.ndarray] | None:
    """In-memory images as HxWx3 uint8 RGB arrays, or None when ``source`` names files."""
    items = source if isinstance(source, (list, tuple)) else [source]
    if not items or all(isinstance(x, (str, os.PathLike)) for x in items):
        return None
    out = []
    for k, x in enumerate(items):
        if isinstance(x, (str, os.PathLike)):
            raise VisionError("predict takes either paths or in-memory images, not both in one list")
        if hasattr(x, "convert") and hasattr(x, "size"):  # a PIL image
            x = np.asarray(x.convert("RGB"))
        a = np.asarray(x)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (3, 4):
            raise VisionError(f"image {k}: expected an HxWx3 RGB array, got shape {a.shape}")
        if a.dtype != np.uint8:
            if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
                a = a * 255.0
            a = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
        a = np.ascontiguousarray(a[..., :3])
        out.append(a if a.flags.writeable else a.copy())  # torch takes only writable memory
    return out


def load(
    weights: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    device: str = "auto",
    precision: str | None = None,
    amp: bool = False,
    tta: bool = False,
    tta_scales: Iterable[float] = (0.8, 1.0, 1.2),
    fusion: str = "wbf",
    iou: float | None = None,
    skip_score: float = 0.0,
    model_weights: Sequence[float] | None = None,
    engine: EngineOptions | None = None,
) -> Model:
    """A checkpoint (or several, fused) ready to predict; its config, task and classes come with it.

    ``config`` is needed only for a plain state_dict (such as torchvision's published weights);
    ``overrides`` change the config (``model.score_thresh=0.3``).  ``precision`` fp32 (default), bf16 or
    fp16; ``tta`` adds flipped and rescaled views; several weights are fused with ``fusion``."""
    from vision.inference.loading import load_for_inference

    sources = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
    if not sources:
        raise VisionError("load() needs at least one weights file")
    loaded = [load_for_inference(w, config, overrides) for w in sources]
    options = PredictOptions(
        device=device, precision=precision, amp=amp, engine=engine if engine is not None else EngineOptions(),
        tta=tta, tta_scales=tuple(float(s) for s in tta_scales), fusion=fusion, iou=iou, skip_score=skip_score,
        model_weights=tuple(model_weights) if model_weights is not None else None,
    )
    return Model(loaded, options)


def train(
    config: str | os.PathLike | Any,
    overrides: Sequence[str] = (),
    *,
    output: str | os.PathLike | None = None,
    resume: str | os.PathLike | bool | None = None,
) -> Path:
    """Trains a YAML recipe (or a ``Config``) with dotted overrides; returns the run folder, which holds
    ``best.pt``, ``last.pt``, ``config.yaml``, ``metrics.jsonl`` and ``curves.png``.  ``resume=True``
    continues the run's ``last.pt``."""
    from vision.config import Config, load_config, merge_overrides
    from vision.runtime import distributed as du
    from vision.tasks.training import run_dir_of
    from vision.tasks.training import train as train_run

    if isinstance(config, Config):
        from vision.config import config_to_dict

        cfg = merge_overrides(config_to_dict(config), overrides)
    else:
        cfg = load_config(config, list(overrides))
    run_dir = Path(output) if output is not None else run_dir_of(cfg)
    try:
        train_run(cfg, run_dir, resume="auto" if resume is True else (resume or None))
    finally:
        du.cleanup()
    return run_dir


def evaluate(weights: str | os.PathLike, config: str | os.PathLike | None = None, overrides: Sequence[str] = (),
             **options: Any) -> dict[str, Any]:
    """The task's metrics of a checkpoint on its config's validation split (COCO AP, mIoU or top-k);
    writes ``metrics.json`` (beside the weights unless ``out=``) and the evaluation's plots (``plots=False``
    to skip them); ``batch_size=`` images per pass."""
    from vision.tasks.evaluation import evaluate_checkpoint

    return evaluate_checkpoint(weights, config, overrides, **options).metrics
