"""Checkpoints: atomic saving, safe loading, and loading weights into a model built from a config.

A vision checkpoint is a dict ``{"model": state_dict, "config": resolved config dict,
"class_names": [...], "arch": str, ...}`` written by ``torch.save`` and read back with
``weights_only=True`` (so it must hold only tensors and plain Python values).  ``load_model_weights``
also takes a plain state_dict, such as torchvision's published detection weights: key names of older
torchvision releases and of flattened timm feature networks are mapped onto the model's, a checkpoint
with another class count is re-headed, and a checkpoint of another architecture is refused.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vision.atomic import atomic_write
from vision.errors import DataError, VisionError

log = logging.getLogger(__name__)

# Layers whose shape depends on the number of classes: re-created when a checkpoint's class count
# differs from the model's.  Other architectures add their prefixes here.
CLASS_DEPENDENT_PREFIXES: list[str] = [
    "head.classification_head.cls_logits.",  # RetinaNet
    "roi_heads.box_predictor.cls_score.",  # Faster / Mask R-CNN
    "roi_heads.box_predictor.bbox_pred.",
    "roi_heads.mask_predictor.mask_fcn_logits.",  # Mask R-CNN
]

# key prefix -> architecture, most specific first (a Mask R-CNN also has a box predictor)
ARCH_SIGNATURES: list[tuple[str, str]] = [
    ("roi_heads.mask_predictor.", "mask_rcnn"),
    ("roi_heads.box_predictor.", "faster_rcnn"),
    ("head.classification_head.", "retinanet"),
]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Key layouts of older torchvision releases (their own _load_from_state_dict hooks do this only when
# the state_dict still carries its version metadata, which a re-saved dict may have lost).
_LEGACY_RENAMES: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
    (re.compile(r"^(rpn\.head\.conv)\.(weight|bias)$"), r"\1.0.0.\2"),
    (
        re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"),
        lambda m: f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}",
    ),
]


@dataclass
class LoadResult:
    """What did not fit: keys left at their initial values, keys ignored, layers re-created."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reheaded: list[str] = field(default_factory=list)


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a half-written file at ``path``.

    Writes a temporary file in the same folder, fsyncs it and renames it over ``path``, so a crash or
    a full disk leaves either the old checkpoint or the new one.
    """
    with atomic_write(path) as f:
        torch.save(obj, f)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_checkpoint_file(path: str | os.PathLike) -> Any:
    """The object in a checkpoint file (tensors on the CPU), read with ``weights_only=True`` (safetensors
    too); a missing, damaged or foreign file is a one-line ``DataError``.  The one place files are read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DataError(path, f"not a readable checkpoint ({reason})") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint; always returns a dict whose ``"model"`` is a state_dict.

    A plain state_dict (torchvision's published weights, a ``.safetensors`` file) comes back as
    ``{"model": state_dict}`` with no ``"config"``: the caller then needs a config to build the model.
    """
    path = Path(path)
    obj = read_checkpoint_file(path)
    if isinstance(obj, dict) and _is_state_dict(obj.get("model")):
        return obj
    if isinstance(obj, dict) and _is_state_dict(obj.get("state_dict")):
        rest = {k: v for k, v in obj.items() if k != "state_dict"}
        return {**rest, "model": obj["state_dict"]}
    if _is_state_dict(obj):
        return {"model": obj}
    what = f"a dict with keys {sorted(obj)[:6]}" if isinstance(obj, dict) else type(obj).__name__
    raise VisionError(f"{path}: no model weights in the checkpoint (found {what})")


def infer_arch(state_dict: dict[str, Any]) -> str | None:
    """The architecture a state_dict belongs to, from its key names (None when unknown)."""
    for prefix, arch in ARCH_SIGNATURES:
        if any(k.startswith(prefix) for k in state_dict):
            return arch
    return None


def num_classes_in(state_dict: dict[str, torch.Tensor]) -> int | None:
    """Object classes (background excluded) a detection state_dict was trained for."""
    w = state_dict.get("roi_heads.box_predictor.cls_score.weight")
    if w is not None:
        return int(w.shape[0]) - 1
    cls = state_dict.get("head.classification_head.cls_logits.weight")
    reg = state_dict.get("head.regression_head.bbox_reg.weight")
    if cls is not None and reg is not None:
        return int(cls.shape[0]) // (int(reg.shape[0]) // 4) - 1
    return None


def _norm(key: str) -> str:
    return key.replace("_", ".")


def remap_state_dict(state_dict: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Renames the keys that are not the model's to the model's name for the same weight, if any.

    Covers wrapper prefixes (DDP, torch.compile), older torchvision layouts, and timm feature networks
    that flatten child names (``stages.0`` in a full model is ``stages_0`` in a feature model).
    """
    by_norm: dict[str, str | None] = {}
    for k in model_keys:
        n = _norm(k)
        by_norm[n] = None if n in by_norm else k  # None: ambiguous, never guess
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        k = key
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        if k not in model_keys:
            for pattern, repl in _LEGACY_RENAMES:
                new = pattern.sub(repl, k)
                if new != k and new in model_keys:
                    k = new
                    break
        if k not in model_keys:
            k = by_norm.get(_norm(k)) or k
        out[k] = value
    return out


def _arch_error(src: str, ckpt_arch: str, model_arch: str) -> VisionError:
    return VisionError(
        f"{src}: the checkpoint is a {ckpt_arch} model but the config builds {model_arch}: "
        f"use a {model_arch} checkpoint or set model.arch={ckpt_arch}"
    )


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def load_model_weights(
    model: nn.Module,
    weights: dict[str, Any] | str | os.PathLike,
    *,
    strict: bool = True,
    source: str | None = None,
) -> LoadResult:
    """Loads a vision checkpoint, a plain state_dict or a checkpoint file into ``model``.

    ``strict``: refuse weights with missing or unexpected keys (after renaming); with ``strict=False``
    they are reported in the result instead.  Shape mismatches in class-dependent layers re-create
    those layers (with a one-line notice); any other shape mismatch is an error (``source`` names an
    already read checkpoint in those messages).  Batch-norm
    ``num_batches_tracked`` counters never count as missing: frozen batch norms do not save them.
    """
    src = str(weights) if isinstance(weights, (str, os.PathLike)) else (source or "weights")
    ckpt = load_checkpoint(weights) if isinstance(weights, (str, os.PathLike)) else weights
    if not isinstance(ckpt, dict):
        raise VisionError(f"{src}: expected a checkpoint dict or a state_dict, got {type(ckpt).__name__}")
    sd = ckpt["model"] if _is_state_dict(ckpt.get("model")) else ckpt
    if not _is_state_dict(sd):
        raise VisionError(f"{src}: no model weights found (neither a state_dict nor a dict with 'model')")

    own = model.state_dict()
    sd = remap_state_dict(sd, set(own))
    model_arch = infer_arch(own)
    ckpt_arch = ckpt.get("arch") if isinstance(ckpt.get("arch"), str) else infer_arch(sd)
    if model_arch and ckpt_arch and model_arch != ckpt_arch:
        raise _arch_error(src, ckpt_arch, model_arch)

    for k, v in own.items():  # frozen batch norms have no counter; a fresh one is as good
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    sd = {k: v for k, v in sd.items() if k in own or not k.endswith("num_batches_tracked")}

    reheaded = []
    for k, v in list(sd.items()):
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            if any(k.startswith(p) for p in CLASS_DEPENDENT_PREFIXES):
                reheaded.append(k)
                del sd[k]
            else:
                raise VisionError(
                    f"{src}: weight '{k}' has shape {tuple(v.shape)} but the model's is "
                    f"{tuple(own[k].shape)}: was it trained with another backbone or fpn_channels?"
                )
    if reheaded:
        names = ckpt.get("class_names")
        n_ckpt = len(names) if isinstance(names, list) else num_classes_in(ckpt.get("model", ckpt))
        n_model = num_classes_in(own)
        counts = f"{n_ckpt} classes, the model {n_model}" if n_ckpt and n_model else "another class count"
        layers = sorted({k.rsplit(".", 1)[0] for k in reheaded})
        log.warning(f"{src}: checkpoint has {counts}: re-initialised {', '.join(layers)}")

    missing = [k for k in own if k not in sd and k not in reheaded]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        raise VisionError(f"{src}: weights do not fit the model: {'; '.join(parts)} keys")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return LoadResult(missing=missing, unexpected=unexpected, reheaded=reheaded)
