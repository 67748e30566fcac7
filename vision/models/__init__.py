"""Models: timm backbones + FPN under torchvision's detection heads; weight loading and remapping."""

from vision.models.build import BUILDERS, build_model
from vision.models.weights import load_checkpoint, load_model_weights, save_checkpoint

__all__ = ["BUILDERS", "build_model", "load_checkpoint", "load_model_weights", "save_checkpoint"]
