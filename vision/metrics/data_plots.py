"""One picture of a data set report (``vision inspect``): sizes, objects per image, box sizes against
the anchors, class counts and the warnings, so a recipe's fit to its data shows at a glance."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from vision.metrics.plots import new_figure, save_png

_COLORS = {"train": "tab:blue", "val": "tab:orange"}


def plot_dataset_report(report: dict[str, Any], out_png: str | Path) -> Path:
    """Six panels from ``vision.data.stats.inspect_data``'s report (with its private arrays)."""
    splits: dict[str, dict[str, Any]] = report["splits"]
    fig = new_figure(16, 9.5)
    (ax_size, ax_count, ax_box), (ax_cls, ax_aspect, ax_text) = fig.subplots(2, 3)

    for name, s in splits.items():
        wh = s.get("_sizes", np.zeros((0, 2)))
        ax_size.scatter(wh[:, 0], wh[:, 1], s=12, alpha=0.5, color=_COLORS.get(name), label=f"{name} ({len(wh)})")
    ax_size.set(title="image sizes", xlabel="width (px)", ylabel="height (px)")
    ax_size.legend(fontsize=8)

    per = {n: s["_per_image"] for n, s in splits.items() if "_per_image" in s}
    if per:
        top = max(int(v.max()) if v.size else 0 for v in per.values())
        bins = np.arange(0, top + 2) - 0.5 if top <= 60 else 40
        for name, v in per.items():
            ax_count.hist(v, bins=bins, alpha=0.6, color=_COLORS.get(name), label=name)
        ax_count.set(title="objects per image", xlabel="objects", ylabel="images")
        ax_count.legend(fontsize=8)
    else:  # classification: samples per image are crops, one count per class panel is enough
        ax_count.axis("off")

    sides = {n: s["_box_sides"] for n, s in splits.items() if len(s.get("_box_sides", []))}
    anchors = splits["train"].get("anchors")
    if sides:
        lo = max(1.0, min(float(v.min()) for v in sides.values()))
        hi = max(float(v.max()) for v in sides.values())
        if anchors:  # room for the smallest anchor, and for one anchor above the largest box
            lo = min(lo, anchors["sizes"][0] / 1.5)
            above = [a for a in anchors["sizes"] if a >= hi]
            hi = max(hi, above[0] * 1.2 if above else anchors["sizes"][-1] * 1.2)
        bins = np.geomspace(lo * 0.9, hi * 1.1, 50)
        for name, v in sides.items():
            ax_box.hist(v, bins=bins, alpha=0.6, color=_COLORS.get(name), label=name)
        ax_box.set_xscale("log")
        if anchors:
            shown = [a for a in anchors["sizes"] if a <= hi]
            for k, a in enumerate(shown):
                ax_box.axvline(a, color="black", linewidth=1, linestyle="--", label="anchor sizes" if k == 0 else None)
            if len(shown) < len(anchors["sizes"]):
                ax_box.text(0.98, 0.5, f"anchors up to {anchors['sizes'][-1]} px", ha="right", fontsize=8,
                            transform=ax_box.transAxes)
        ax_box.legend(fontsize=8)
    resize = splits["train"].get("box_side_px", {}).get("resize")
    where = f" at min_size {resize['evaluated_at']}, max {resize['max_size']}" if resize else ""
    what = "crop side" if "box_side_px" not in splits["train"] else "box sqrt(area)"
    ax_box.set(title=f"{what} (px{where})", xlabel="px", ylabel="count")

    names = report["class_names"]
    x = np.arange(len(names))
    width = 0.8 / max(1, len(splits))
    for i, (name, s) in enumerate(splits.items()):
        counts = [s["classes"]["counts"][n] for n in names]
        bars = ax_cls.bar(x + i * width - 0.4 + width / 2, counts, width, color=_COLORS.get(name), label=name)
        ax_cls.bar_label(bars, fontsize=7)
    imbalance = splits["train"]["classes"]["imbalance"]
    ax_cls.set_xticks(x, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax_cls.set(title=f"class counts (train imbalance {imbalance}:1)" if imbalance else "class counts", ylabel="count")
    if imbalance and imbalance > 10:
        ax_cls.set_yscale("log")
    ax_cls.legend(fontsize=8)

    drawn = False
    for name in splits:
        pct = splits[name].get("box_side_px", {}).get("aspect_h_over_w")
        if pct:
            ps = [float(k[1:]) for k in pct]
            ax_aspect.plot(ps, list(pct.values()), marker="o", color=_COLORS.get(name), label=name)
            drawn = True
    if drawn:
        ax_aspect.set_yscale("log")
        if anchors:
            for r in anchors["aspect_ratios"]:
                ax_aspect.axhline(r, color="black", linewidth=1, linestyle="--")
        ax_aspect.set(title="box height / width by percentile (dashed: anchor ratios)", xlabel="percentile",
                      ylabel="h / w")
        ax_aspect.legend(fontsize=8)
    else:
        ax_aspect.axis("off")

    ax_text.axis("off")
    lines = report["warnings"] or ["no warnings"]
    wrapped = "\n".join(textwrap.fill(f"- {w}", 62, subsequent_indent="  ") for w in lines[:12])
    ax_text.text(0, 1, wrapped, va="top", ha="left", fontsize=8, family="monospace", transform=ax_text.transAxes)
    ax_text.set_title("warnings")
    fig.suptitle(f"{report['name']} ({report['arch']}): data set report")
    return save_png(fig, out_png)
