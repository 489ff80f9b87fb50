"""ResNet18 with CBAM, keeping torchvision's module names so state dicts move both ways.

Backbone keys (conv1, bn1, layer1..layer4, fc) are exactly torchvision's resnet18's; CBAM adds
``cbam.layer<k>.*`` (placement=stage, after each stage) or ``layer<k>.<i>.cbam.*`` (placement=block,
on the residual branch before the addition, as in the CBAM paper).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from cbam_train.config.schema import RESNET18_WIDTH
from cbam_train.models.cbam import CBAM

if TYPE_CHECKING:
    from cbam_train.config.schema import ModelConfig

BLOCKS_PER_STAGE = (2, 2, 2, 2)  # ResNet18


def stage_channels(width: int = RESNET18_WIDTH) -> tuple:
    """Channels of layer1..layer4: the base width, doubled at each stage ((64, 128, 256, 512) for ResNet18)."""
    return tuple(width * 2**k for k in range(len(BLOCKS_PER_STAGE)))


class CBAMBasicBlock(BasicBlock):
    """torchvision's BasicBlock with CBAM applied to the residual branch before the addition."""

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: Optional[nn.Module], cbam: CBAM) -> None:
        super().__init__(inplanes, planes, stride, downsample)
        self.cbam = cbam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.cbam(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class ResNetCBAM(nn.Module):
    """ResNet18 + CBAM. ``width``: conv1's and layer1's channels (64: ResNet18; narrower keeps every module,
    key name and code path at a fraction of the compute). ``freeze_bn``: BatchNorm layers whose parameters are
    all frozen stay in eval mode through ``train()``, so frozen layers neither use batch statistics nor update
    them."""

    def __init__(self, num_classes: int = 10, stem: str = "cifar", cbam_enabled: bool = True,
                 placement: str = "stage", reduction: int = 16, kernel_size: int = 7,
                 init: str = "identity", width: int = RESNET18_WIDTH) -> None:
        super().__init__()
        channels = stage_channels(width)
        if stem == "cifar":  # 32x32 inputs: keep full resolution into layer1
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            raise ValueError(f"model.stem: unknown value {stem!r}; choose one of: cifar, imagenet")
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        in_ch = width
        in_block = cbam_enabled and placement == "block"
        for k, (ch, n) in enumerate(zip(channels, BLOCKS_PER_STAGE, strict=True), start=1):
            blocks = []
            for i in range(n):
                stride = 2 if (i == 0 and k > 1) else 1
                down = None
                if stride != 1 or in_ch != ch:
                    down = nn.Sequential(conv1x1(in_ch, ch, stride), nn.BatchNorm2d(ch))
                if in_block:
                    blocks.append(CBAMBasicBlock(in_ch, ch, stride, down, CBAM(ch, reduction, kernel_size, init)))
                else:
                    blocks.append(BasicBlock(in_ch, ch, stride, down))
                in_ch = ch
            setattr(self, f"layer{k}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[-1], num_classes)
        self._init_backbone()  # before the stage CBAMs exist: their own init must not be overwritten
        if cbam_enabled and placement == "stage":
            self.cbam = nn.ModuleDict(
                {f"layer{k}": CBAM(ch, reduction, kernel_size, init) for k, ch in enumerate(channels, 1)})
        elif placement not in ("stage", "block"):
            raise ValueError(f"model.cbam.placement: unknown value {placement!r}; choose one of: stage, block")
        self.freeze_bn = True

    def _init_backbone(self) -> None:
        # torchvision's ResNet init; CBAM modules keep the init their `init` option chose.
        for name, m in self.named_modules():
            if ".cbam" in name or name.startswith("cbam"):
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def train(self, mode: bool = True) -> "ResNetCBAM":
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in m.parameters()):
                    m.eval()
        return self

    def _stage(self, k: int, x: torch.Tensor) -> torch.Tensor:
        x = getattr(self, f"layer{k}")(x)
        cbam = getattr(self, "cbam", None)
        return cbam[f"layer{k}"](x) if isinstance(cbam, nn.ModuleDict) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W) normalised -> logits (B, classes)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for k in range(1, 5):
            x = self._stage(k, x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(cfg: "ModelConfig") -> ResNetCBAM:
    """Build the model described by a ModelConfig (weights are loaded separately, see checkpoint.py)."""
    return ResNetCBAM(num_classes=cfg.num_classes, stem=cfg.stem, cbam_enabled=cfg.cbam.enabled,
                      placement=cfg.cbam.placement, reduction=cfg.cbam.reduction,
                      kernel_size=cfg.cbam.kernel_size, init=cfg.cbam.init, width=cfg.width)
