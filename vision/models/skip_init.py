"""Building a model whose every weight a checkpoint is about to overwrite, without initialising them.

``torch.nn.init``'s fills (Kaiming, normal, uniform, constants) over a ResNet-50 RetinaNet's 36 million
parameters take about a quarter of a second: a measurable share of predicting one photo, spent on
values the checkpoint replaces a moment later.  Inside ``initialisers_skipped()`` those fills return
their tensor untouched (left as allocated), as Hugging Face's ``no_init_weights`` does.  Only for a
model that is then loaded strictly: a tensor no checkpoint key fills would hold whatever memory held.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

# torch.nn.init's in-place fills; the modules' reset_parameters() reach them through the module.
_FILLS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
          "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")
_LOCK = threading.Lock()


def _untouched(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def initialisers_skipped() -> Iterator[None]:
    """``torch.nn.init``'s fills do nothing inside (process-wide, so one build at a time holds it)."""
    with _LOCK:
        saved = {name: getattr(torch.nn.init, name) for name in _FILLS if hasattr(torch.nn.init, name)}
        try:
            for name in saved:
                setattr(torch.nn.init, name, _untouched)
            yield
        finally:
            for name, fill in saved.items():
                setattr(torch.nn.init, name, fill)
