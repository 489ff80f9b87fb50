"""The tutorial post's state-dict layout, and its one-to-one map onto this model's (``model.cbam.init=seed``).

The post's ``ResNet18_CBAM`` keeps torchvision's resnet18 under ``backbone.`` and adds ``cbam_layer<k>``
modules: a channel MLP of two bias-free ``nn.Linear`` (``channel_attn.fc.0``, ``channel_attn.fc.2``) and a
bias-free 7x7 ``spatial_attn.conv``. Here the same tensors are ``cbam.layer<k>.channel.mlp.{0,2}`` (1x1 convs:
the Linear weight with two trailing unit dimensions) and ``cbam.layer<k>.spatial.conv``. So a file the
post saved (``resnet18_cbam_finetuned.pth``) loads with ``model.weights=``, ``init_from=`` or
``task=eval checkpoint=``, and ``to_post`` writes this model's weights back in the post's names.
"""

from __future__ import annotations

import re

_POST_CBAM = re.compile(r"^cbam_layer([1-4])\.(channel_attn\.fc\.[02]|spatial_attn\.conv)\.weight$")
_OURS_CBAM = re.compile(r"^cbam\.layer([1-4])\.(channel\.mlp\.[02]|spatial\.conv)\.weight$")
_TO_OURS = {"channel_attn.fc.0": "channel.mlp.0", "channel_attn.fc.2": "channel.mlp.2",
            "spatial_attn.conv": "spatial.conv"}
_TO_POST = {v: k for k, v in _TO_OURS.items()}


def is_post_layout(state: dict) -> bool:
    """Whether a state dict has the post's names (a ``backbone.`` ResNet and ``cbam_layer1`` modules)."""
    return any(k.startswith("backbone.") for k in state) and any(k.startswith("cbam_layer1.") for k in state)


def from_post(state: dict) -> dict:
    """The post's state dict in this model's names; keys outside its layout are kept as they are, so a
    strict load names them."""
    out = {}
    for key, value in state.items():
        m = _POST_CBAM.match(key)
        if m:
            k, part = m.groups()
            if part.startswith("channel_attn") and value.dim() == 2:  # Linear (out, in) -> 1x1 conv (out, in, 1, 1)
                value = value[:, :, None, None]
            out[f"cbam.layer{k}.{_TO_OURS[part]}.weight"] = value
        elif key.startswith("backbone."):
            out[key[len("backbone."):]] = value
        else:
            out[key] = value
    return out


def to_post(state: dict) -> dict:
    """This model's state dict (``init=seed``, ``placement=stage``) in the post's names, loadable into its
    ``ResNet18_CBAM`` with ``load_state_dict(strict=True)``."""
    out = {}
    for key, value in state.items():
        m = _OURS_CBAM.match(key)
        if m:
            k, part = m.groups()
            if part.startswith("channel") and value.dim() == 4:
                value = value.flatten(1)
            out[f"cbam_layer{k}.{_TO_POST[part]}.weight"] = value
        elif key.startswith("cbam."):
            raise ValueError(f"{key}: the post's network has no such tensor (save with model.cbam.init=seed)")
        else:
            out[f"backbone.{key}"] = value
    return out

