"""vision: image classification, object detection and segmentation on timm backbones and torchvision heads.

```python
import vision
model = vision.load("runs/bccd/best.pt")
results = model.predict("images/")
```

``load``, ``train`` and ``evaluate`` (``vision.api``) are imported on first use, so ``import vision``
stays cheap for the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Model", "Result", "evaluate", "load", "train"]

if TYPE_CHECKING:
    from vision.api import Model, evaluate, load, train
    from vision.inference.result import Result


def __getattr__(name: str) -> Any:
    if name in ("load", "train", "evaluate", "Model"):
        from vision import api

        return getattr(api, name)
    if name == "Result":
        from vision.inference.result import Result

        return Result
    raise AttributeError(f"module 'vision' has no attribute {name!r}")
