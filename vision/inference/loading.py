"""A trained model for inference, from a vision checkpoint (config inside) or a state_dict plus a config.

The checkpoint is opened once: its weights, config, categories and architecture all come from that one
read, and every command and the Python API load models through here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vision.config import Config, load_config, merge_overrides
from vision.data.records import Categories
from vision.errors import VisionError

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model in eval mode with what was read beside it."""

    model: torch.nn.Module
    cfg: Config
    categories: Categories
    source: str

    @property
    def arch(self) -> str:
        return self.cfg.model.arch



def categories_from_checkpoint(ckpt: dict[str, Any]) -> Categories:
    """The data set's own category ids where the checkpoint kept them, else 1..K for its class names."""
    cats = ckpt.get("categories")
    if isinstance(cats, dict) and "ids" in cats and "names" in cats:
        return Categories(tuple(int(i) for i in cats["ids"]), tuple(str(n) for n in cats["names"]))
    names = ckpt.get("class_names")
    if not names:
        raise VisionError("checkpoint has no class names; give --config with data.class_names")
    log.warning(
        "checkpoint keeps class names but not their category ids (an older vision checkpoint): "
        "ids 1..%d are assumed", len(names),
    )
    return Categories.from_names(names)


def resolve_config(
    weights: str | os.PathLike, ckpt: dict[str, Any], config: str | os.PathLike | None, overrides: Sequence[str],
    missing: str,
) -> Config:
    """``config`` (+ overrides) when given, else the checkpoint's own config (+ overrides); a plain
    state_dict without ``config`` is ``"{weights}: {missing}"``."""
    if config:
        return load_config(config, list(overrides))
    if isinstance(ckpt.get("config"), dict):
        return merge_overrides(ckpt["config"], overrides)
    raise VisionError(f"{weights}: {missing}")


def load_for_inference(
    weights: str | os.PathLike, config: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> LoadedModel:
    """The model of ``weights`` in eval mode, its config (``config`` or the checkpoint's, plus overrides)
    and categories; a plain state_dict needs ``config`` to say which model it is."""
    from vision.models import build_model
    from vision.models.skip_init import initialisers_skipped
    from vision.models.weights import load_checkpoint, load_model_weights

    ckpt = load_checkpoint(weights)
    cfg = resolve_config(weights, ckpt, config, overrides, "a plain state_dict needs --config to say which model it is")
    if isinstance(ckpt.get("config"), dict):  # a vision checkpoint
        categories = categories_from_checkpoint(ckpt)
    elif cfg.data.class_names:
        categories = Categories.from_names(cfg.data.class_names)
    else:
        categories = Categories.from_names([str(i) for i in range(1, cfg.model.num_classes + 1)])
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = len(categories)
    cfg.model.pretrained = None  # the checkpoint supplies every weight
    cfg.model.init_from = None
    with initialisers_skipped():  # the checkpoint supplies every weight (strict loading checks it)
        model = build_model(cfg.model)
    reheaded = load_model_weights(model, ckpt, source=str(weights)).reheaded
    if reheaded:  # layers the checkpoint does not fill take their initial values from an initialised build
        initialised, own = build_model(cfg.model).state_dict(), model.state_dict()
        for key in reheaded:
            own[key].copy_(initialised[key])
    model.eval()
    return LoadedModel(model, cfg, categories, str(Path(weights)))


def load_model_for_inference(
    weights: str | os.PathLike, config: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> tuple[torch.nn.Module, Config, Categories]:
    """``load_for_inference`` as a (model, config, categories) tuple."""
    loaded = load_for_inference(weights, config, overrides)
    return loaded.model, loaded.cfg, loaded.categories
