"""What a run records: ``metrics.jsonl`` (one JSON object per line), TensorBoard scalars, console.

Only rank 0 writes.  On resume the records past the checkpoint's iteration are dropped, in the JSON
lines file and in TensorBoard (``purge_step``), so a resumed run's logs read as if it had never been
interrupted.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


def _plain(value: Any) -> Any:
    """JSON has no NaN/inf and no tensors; keep the log readable by any JSON parser."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricLogger:
    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, resume_iter: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_iter is not None:
            self._truncate(resume_iter)
        elif self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_iter is None else resume_iter + 1
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge)
        except ImportError:  # tensorboard is a dependency, but a stripped install should still train
            self._tb = None

    def _truncate(self, resume_iter: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the crash
            if int(rec.get("iter", 0)) <= resume_iter:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def log(self, kind: str, step: int, values: dict[str, Any], **extra: Any) -> None:
        """One record: ``kind`` is ``train`` or ``eval``; scalars go to TensorBoard as ``kind/key``."""
        if not self.enabled:
            return
        rec = {"kind": kind, "iter": step, **{k: _plain(v) for k, v in extra.items()}}
        rec.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                value = _plain(value)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def console(message: str) -> None:
    """A line that does not break an active progress bar."""
    tqdm.write(message, file=sys.stderr)


def progress(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
        mininterval=1.0, leave=False, file=sys.stderr, unit="it",
    )
