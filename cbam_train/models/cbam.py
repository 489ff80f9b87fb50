"""CBAM (Woo et al., 2018): channel attention, then spatial attention, each a multiplicative gate.

Two initialisations:
- ``seed``: plain sigmoid gates with PyTorch's default init, as the tutorial recipe does. At init
  every gate is ~0.5, so CBAM roughly halves (and distorts) the features a pretrained backbone feeds it.
- ``identity``: gates are ``2 * sigmoid(z)`` and the layer producing ``z`` starts at zero, so each
  gate is exactly 1.0 and CBAM(x) == x at initialisation; gradients still reach the zeroed layer
  (d gate / dz = 0.5 at z = 0), so attention is learned from a pass-through start.

The spatial conv has a bias only under ``identity``. ``seed`` is the tutorial's network to the letter: its
``SpatialAttention`` conv is ``bias=False``, and with no extra tensor the state dict maps one-to-one onto
the post's (models/post.py). ``identity`` keeps the bias: with the conv's weights zeroed at the start, the
bias is what lets the spatial gate learn a level of its own (the role the BatchNorm after the conv plays in
the CBAM authors' code), and checkpoints saved with ``identity`` hold it.
"""

from __future__ import annotations

import torch
from torch import nn

INITS = ("identity", "seed")


class ChannelAttention(nn.Module):
    """Gate per channel from a shared MLP over the average- and max-pooled descriptors."""

    def __init__(self, channels: int, reduction: int = 16, init: str = "identity") -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            expand := nn.Conv2d(hidden, channels, 1, bias=False),
        )
        self.gain = 2.0 if init == "identity" else 1.0
        if init == "identity":
            nn.init.zeros_(expand.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W) -> gate (B, C, 1, 1)
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return self.gain * torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """Gate per pixel from a k x k conv over the channel-wise mean and max maps."""

    def __init__(self, kernel_size: int = 7, init: str = "identity") -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=init == "identity")
        self.gain = 2.0 if init == "identity" else 1.0
        if init == "identity":
            assert self.conv.bias is not None  # bias=True under identity, one line up
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W) -> gate (B, 1, H, W)
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return self.gain * torch.sigmoid(self.conv(maps))


class CBAM(nn.Module):
    """x -> x * Mc(x) -> (.) * Ms(.), as in the CBAM paper (channel first, then spatial)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, init: str = "identity") -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"CBAM init: unknown value {init!r}; choose one of: {', '.join(INITS)}")
        self.channel = ChannelAttention(channels, reduction, init)
        self.spatial = SpatialAttention(kernel_size, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel(x)
        return x * self.spatial(x)
