from cbam_train.models.cbam import CBAM, ChannelAttention, SpatialAttention
from cbam_train.models.resnet import ResNetCBAM, build_model

__all__ = ["CBAM", "ChannelAttention", "SpatialAttention", "ResNetCBAM", "build_model"]
