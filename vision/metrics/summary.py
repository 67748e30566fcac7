"""Nested metrics flattened into the numbers logs and curves take."""

from __future__ import annotations

from typing import Any


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"bbox": {"AP": ..}, "mIoU": ..}`` -> ``{"bbox_AP": .., "mIoU": ..}`` for logging.

    Top-level numbers and one level of nested numbers are kept; per-class tables and text are not.
    """
    out: dict[str, float] = {}
    for group, values in (metrics or {}).items():
        if group.startswith("per_class") or group == "summary":
            continue
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            out[group] = float(values)
        elif isinstance(values, dict):
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"{group}_{key}"] = float(value)
    return out
