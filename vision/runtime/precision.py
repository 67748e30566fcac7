"""Which precision a run computes in, decided in one place for training, evaluation and prediction.

``fp32`` is the default everywhere.  Reduced precision is bfloat16 on a CPU, and only where oneDNN runs
it natively (AVX512-BF16 or AMX: a BCCD Faster R-CNN training step ~1.5x faster than float32; emulated,
several times slower), float16 (with loss scaling in training) or bfloat16 on CUDA.  Training's
``train.amp`` falls back to float32 with a message on a CPU without native bfloat16; an explicit
``--precision bf16`` there is an error instead, since the user asked for that precision by name.
"""

from __future__ import annotations

import contextlib

import torch

from vision.errors import ConfigError
from vision.runtime.logging import console

PRECISIONS = ("fp32", "bf16", "fp16")


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively here (AVX512-BF16 / AMX); emulated bfloat16 is slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: float32), or a clear error."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}': expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type == "cpu":
        if precision == "fp16":
            raise ConfigError("precision fp16 is for CUDA; on a CPU use bf16")
        if not cpu_has_native_bf16():
            raise ConfigError("precision bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX); use fp32")
        return torch.bfloat16
    return torch.float16 if precision == "fp16" else torch.bfloat16


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = precision_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def mixed_precision_usable(device: torch.device, amp: bool, verbose: bool = True) -> bool:
    """``train.amp`` (and ``--amp``) where it pays: bfloat16 autocast on a CPU only where oneDNN runs bfloat16 natively
    (a BCCD Faster R-CNN step ~1.5x faster than float32 there; emulated, several times slower)."""
    if amp and device.type == "cpu" and not cpu_has_native_bf16():
        if verbose:
            console("train.amp: this CPU has no native bfloat16 (AVX512-BF16 or AMX); training in float32")
        return False
    return amp


def amp_precision(device: torch.device, amp: bool, verbose: bool = True) -> str:
    """The precision ``amp`` (mixed precision on or off) means on ``device``, the CPU fallback applied."""
    if not mixed_precision_usable(device, amp, verbose):
        return "fp32"
    return "fp16" if device.type == "cuda" else "bf16"
