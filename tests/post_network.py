"""The tutorial post's ResNet18_CBAM, rebuilt from what it specifies (../shared/seed/): module names, layer
shapes, bias flags and forward order. Only the tests use it, as the reference `experiment=seed` must match."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18


class PostChannelAttention(nn.Module):
    def __init__(self, in_channels: int, ratio: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Sequential(nn.Linear(in_channels, in_channels // ratio, bias=False), nn.ReLU(),
                                nn.Linear(in_channels // ratio, in_channels, bias=False))
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        avg_out = self.fc(self.avg_pool(x).view(b, c))
        max_out = self.fc(self.max_pool(x).view(b, c))
        return x * self.sigmoid(avg_out + max_out).view(b, c, 1, 1)


class PostSpatialAttention(nn.Module):
    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg_out = torch.mean(x, dim=1, keepdim=True)
        max_out, _ = torch.max(x, dim=1, keepdim=True)
        return x * self.sigmoid(self.conv(torch.cat([avg_out, max_out], dim=1)))


class PostCBAM(nn.Module):
    def __init__(self, in_channels: int, ratio: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel_attn = PostChannelAttention(in_channels, ratio)
        self.spatial_attn = PostSpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial_attn(self.channel_attn(x))


class PostResNet18CBAM(nn.Module):
    """torchvision's resnet18 as `backbone` (new 3x3 stride-1 conv1, max-pool removed, new fc) and a CBAM
    after each of its four stages, as `cbam_layer1..4`. Random weights: the tests copy them over."""

    def __init__(self, num_classes: int = 10, cbam_ratio: int = 16, cbam_kernel: int = 7) -> None:
        super().__init__()
        self.backbone = resnet18(weights=None)
        self.backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.backbone.maxpool = nn.Identity()
        for k, ch in enumerate((64, 128, 256, 512), start=1):
            setattr(self, f"cbam_layer{k}", PostCBAM(ch, cbam_ratio, cbam_kernel))
        self.backbone.fc = nn.Linear(in_features=512, out_features=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.relu(b.bn1(b.conv1(x)))
        x = self.cbam_layer1(b.layer1(x))
        x = self.cbam_layer2(b.layer2(x))
        x = self.cbam_layer3(b.layer3(x))
        x = self.cbam_layer4(b.layer4(x))
        return b.fc(torch.flatten(b.avgpool(x), 1))
