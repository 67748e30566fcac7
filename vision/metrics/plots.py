"""PNG pictures of a run and of its evaluation, drawn with matplotlib from plain data.

Each function takes what a run already has (``metrics.jsonl``, a pycocotools ``COCOeval``, a
confusion matrix, per-class IoU) and writes one PNG atomically, returning its path, so a report
folder never holds half an image.  matplotlib is imported inside the drawing functions, on its
object-oriented API with the Agg canvas: no display, no pyplot global state, and nothing to pay for
in commands that never draw.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vision.metrics.confusion import classification_confusion_matrix, detection_confusion_matrix

__all__ = [
    "detection_confusion_matrix",
    "plot_class_iou",
    "plot_classification_confusion",
    "plot_confusion_matrix",
    "plot_pr_curves",
    "plot_training_curves",
    "pr_curves",
    "read_metrics_jsonl",
]

# train-record keys that are not loss terms
_NOT_LOSSES = {"kind", "iter", "epoch", "loss", "lr", "grad_norm", "images_per_s"}
# the validation numbers worth a curve, in the order they are looked for
_HEADLINE = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "mIoU", "pixel_accuracy",
             "top1", "top5", "mean_class_accuracy", "mAP")


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, out_png: str | Path) -> Path:
    from vision.atomic import atomic_write

    out = Path(out_png)
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png")
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_metrics_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``; a line torn by a crash is skipped, as on resume."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "iter" in rec:
            records.append(rec)
    return records


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["iter"]), float(r[key])) for r in records if _number(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Loss (total and each term), learning rate, validation metrics and gradient norm over iterations."""
    records = read_metrics_jsonl(metrics_jsonl)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig = new_figure(12, 8)
    (ax_loss, ax_lr), (ax_val, ax_grad) = fig.subplots(2, 2)

    terms = sorted({k for r in train for k, v in r.items() if k not in _NOT_LOSSES and _number(v)})
    x, y = _series(train, "loss")
    if x:
        ax_loss.plot(x, y, color="black", linewidth=2, label="loss (total)")
    for key in terms:
        ax_loss.plot(*_series(train, key), linewidth=1, label=key)
    _finish(ax_loss, "training loss", "loss", bool(x or terms))
    if x and min(y) > 0 and max(y) / min(y) > 20:
        ax_loss.set_yscale("log")

    x, y = _series(train, "lr")
    ax_lr.plot(x, y, color="tab:blue")
    _finish(ax_lr, "learning rate", "lr", bool(x), legend=False)

    keys = [k for k in _HEADLINE if any(_number(r.get(k)) for r in evals)]
    if not keys:  # an evaluator this list does not know: its numbers, whatever they are called
        keys = sorted({k for r in evals for k, v in r.items() if k not in ("kind", "iter", "epoch") and _number(v)})[:6]
    for key in keys:
        ax_val.plot(*_series(evals, key), marker="o", label=key)
    _finish(ax_val, "validation", "value", bool(keys))

    x, y = _series(train, "grad_norm")
    ax_grad.plot(x, y, color="tab:red", label="grad norm")
    if x:
        speed = ax_grad.twinx()
        speed.plot(*_series(train, "images_per_s"), color="tab:gray", linewidth=1, label="images/s")
        speed.set_ylabel("images/s")
    _finish(ax_grad, "gradient norm (red), throughput (grey)", "grad norm", bool(x), legend=False)
    last = max((int(r["iter"]) for r in records), default=0)
    if last > 0:  # one iteration axis for all panels: a single evaluation sits where it happened
        for ax in (ax_loss, ax_lr, ax_val, ax_grad):
            ax.set_xlim(0, last * 1.02)
    fig.suptitle(str(Path(metrics_jsonl).parent.name or metrics_jsonl))
    return save_png(fig, out_png)


def _finish(ax: Any, title: str, ylabel: str, has_data: bool, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not has_data:
        ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes, color="gray")
    elif legend:
        ax.legend(fontsize=8)


def pr_curves(coco_eval: Any) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """``(recall [R], class names, precision at IoU 0.5 [K, R], precision averaged over IoU 0.5:0.95 [K, R])``.

    pycocotools' ``eval["precision"]`` is [T iou thresholds, R recall points, K classes, A areas,
    M detection limits], -1 where a class has no ground truth (those rows stay -1 here); the curves
    take area "all" and the last (largest) detection limit, as the AP it reports does, so a curve's
    mean is that class's AP50 (or AP).
    """
    p = np.asarray(coco_eval.eval["precision"], np.float64)
    params = coco_eval.params
    t50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    p = p[:, :, :, list(params.areaRngLbl).index("all"), -1]  # [T, R, K]
    p50 = p[t50].T
    absent = (p < 0).any(axis=(0, 1))
    pmean = np.where(absent[:, None], -1.0, p.mean(0).T)
    cats = {c["id"]: c.get("name", str(c["id"])) for c in coco_eval.cocoGt.loadCats(params.catIds)}
    return np.asarray(params.recThrs, np.float64), [str(cats.get(c, c)) for c in params.catIds], p50, pmean


def plot_pr_curves(coco_eval: Any, out_png: str | Path, title: str = "") -> Path:
    """Per-class precision-recall curves (legend: each curve's AP) at IoU 0.5 and over 0.5:0.95, from an
    accumulated pycocotools COCOeval; the black curve is the mean over the classes with ground truth."""
    recall, names, p50, pmean = pr_curves(coco_eval)
    fig = new_figure(13, 5.5)
    axes = fig.subplots(1, 2)
    for ax, curves, label in ((axes[0], p50, "IoU 0.5"), (axes[1], pmean, "IoU 0.5:0.95 (mean)")):
        shown = [k for k in range(len(names)) if (curves[k] >= 0).all()]
        for k in shown:
            ax.plot(recall, curves[k], linewidth=1.2, label=f"{names[k]} {curves[k].mean():.3f}")
        if shown:
            mean = curves[shown].mean(0)
            ax.plot(recall, mean, color="black", linewidth=2.5, label=f"all classes {mean.mean():.3f}")
            ax.legend(fontsize=8, loc="lower left", ncol=1 if len(shown) <= 12 else 2)
        else:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=f"precision-recall, {label}")
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_png(fig, out_png)


def plot_confusion_matrix(
    matrix: np.ndarray, names: Sequence[str], out_png: str | Path, normalize: bool = True, title: str = ""
) -> Path:
    """A heat map, rows true class, columns predicted; ``normalize`` shades by each row's share.

    ``names`` names the classes; a matrix one larger (a detection matrix) gets "background" last.
    Cells show counts (and the row share when normalised), so rare classes stay readable.
    """
    m = np.asarray(matrix, np.float64)
    names = [str(n) for n in names]
    if len(m) == len(names) + 1:
        names = [*names, "background"]
    if m.shape != (len(names), len(names)):
        raise ValueError(f"a {m.shape} matrix for {len(names)} names")
    rows = m.sum(1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0) if normalize else m
    k = len(names)
    side = min(4 + 0.6 * k, 30)
    fig = new_figure(side + 1.5, side)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, m.max()))
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the row" if normalize else "count")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        top = share.max() if share.size else 1.0
        for i in range(k):
            for j in range(k):
                text = f"{int(m[i, j])}" + (f"\n{share[i, j]:.2f}" if normalize and rows[i, 0] else "")
                ink = "white" if share[i, j] > 0.6 * (top or 1) else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=ink)
    ax.set_title(title or ("confusion matrix (rows normalised)" if normalize else "confusion matrix"))
    return save_png(fig, out_png)


def plot_classification_confusion(
    labels: Sequence[int], predicted: Sequence[int], names: Sequence[str], out_png: str | Path,
    normalize: bool = True,
) -> Path:
    """The confusion matrix of class indices (true vs predicted), drawn by ``plot_confusion_matrix``."""
    matrix = classification_confusion_matrix(labels, predicted, len(names))
    return plot_confusion_matrix(matrix, names, out_png, normalize)


def plot_class_iou(per_class_iou: Mapping[str, float | None], out_png: str | Path, title: str = "") -> Path:
    """Horizontal bars of each class's IoU, the mean of those that have one as a dashed line."""
    names = list(per_class_iou)
    values = [per_class_iou[n] for n in names]
    known = [v is not None and math.isfinite(v) for v in values]
    fig = new_figure(8, max(2.5, 0.45 * len(names) + 1.5))
    ax = fig.subplots()
    y = np.arange(len(names))
    bars = [float(v) if ok else 0.0 for v, ok in zip(values, known)]
    ax.barh(y, bars, color=["tab:blue" if ok else "lightgray" for ok in known])
    for yi, v, ok in zip(y, bars, known):
        ax.text(min(v, 0.9) + 0.01, yi, f"{v:.3f}" if ok else "n/a", va="center", fontsize=9)
    if any(known):
        mean = float(np.mean([b for b, ok in zip(bars, known) if ok]))
        ax.axvline(mean, color="black", linestyle="--", label=f"mean IoU {mean:.3f}")
        ax.legend(loc="lower right", fontsize=9)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="IoU", title=title or "per-class IoU")
    ax.grid(True, axis="x", alpha=0.3)
    return save_png(fig, out_png)
