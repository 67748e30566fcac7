"""Where training runs and in which precision.

One place decides the device (``auto`` | ``cpu`` | ``cuda`` | ``cuda:1``), the autocast dtype
(bfloat16 on CPU: no scaler needed and supported by every recent CPU kernel; float16 on CUDA, paired
with a ``GradScaler``), and how batches reach the device (pinned host memory + ``non_blocking`` copies
on CUDA, so the copy overlaps the previous step instead of stalling it).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from vision.errors import ConfigError


def select_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """``train.device`` -> a torch device; under ``torchrun`` each process takes its local GPU."""
    spec = (spec or "auto").strip().lower()
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={spec}: CUDA is not available on this machine (use cpu or auto)")
        if spec == "cuda":
            index = local_rank % torch.cuda.device_count()
        else:
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise ConfigError(f"train.device={spec}: expected cuda or cuda:N") from None
            if index >= torch.cuda.device_count():
                raise ConfigError(
                    f"train.device={spec}: only {torch.cuda.device_count()} CUDA device(s) are visible"
                )
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    raise ConfigError(f"train.device={spec}: expected auto, cpu, cuda or cuda:N")


def autocast_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op context when AMP is off."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(device))


def make_grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """float16 needs loss scaling; bfloat16 has float32's range, so the scaler stays disabled on CPU."""
    return torch.amp.GradScaler(device.type, enabled=amp and autocast_dtype(device) == torch.float16)


def use_pinned_memory(device: torch.device) -> bool:
    return device.type == "cuda"


def to_device(
    images: list[torch.Tensor], targets: list[dict[str, Any]] | None, device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]] | None]:
    """Moves a collated batch; copies are asynchronous from pinned memory, so no host sync here."""
    non_blocking = device.type == "cuda"
    images = [img.to(device, non_blocking=non_blocking) for img in images]
    if targets is not None:
        targets = [
            {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in t.items()}
            for t in targets
        ]
    return images, targets


def set_deterministic(enabled: bool) -> None:
    """Bit-for-bit repeatable kernels where PyTorch has them; warns (not fails) where it does not."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
