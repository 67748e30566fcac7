"""vision: image classification, object detection and segmentation on timm backbones and torchvision heads."""

__version__ = "0.1.0"
