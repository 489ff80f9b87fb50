"""Models: ResNet18 with CBAM (torchvision's module names, any width) and the tutorial post's state-dict layout."""

from cbam_train.models.cbam import CBAM, ChannelAttention, SpatialAttention
from cbam_train.models.resnet import ResNetCBAM, build_model

__all__ = ["CBAM", "ChannelAttention", "SpatialAttention", "ResNetCBAM", "build_model"]
