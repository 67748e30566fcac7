"""Models: timm backbones + FPN under torchvision's detection heads; weight loading and remapping."""

from vision.models.build import BUILDERS, build_model

__all__ = ["BUILDERS", "build_model"]
