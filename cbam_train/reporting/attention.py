"""What the attention does, as numbers: every CBAM module's channel and spatial gates on a batch (forward hooks),
Grad-CAM of the predicted class on layer4's last block (after its attention), and the summaries attention.json holds.

Nothing here changes the model: it runs in eval mode, and Grad-CAM takes the gradient of the class score with
respect to the pooled layer4 features only (torch.autograd.grad), so no parameter's .grad is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbam_train.models.cbam import CBAM

GATE_REFERENCE = 1.0  # a gate of exactly 1 passes its input through; init=identity starts every gate there
HIST_BINS = 40  # channel-gate histogram bins over [0, 2] (the range of identity's 2 * sigmoid gates)


@dataclass
class Attention:
    """One batch through the model. Gates per CBAM module name (`layer4`, or `layer4.1` under placement=block)."""

    probs: Tensor  # (B, classes), softmax of the logits
    pred: Tensor  # (B,) predicted class
    channel: dict  # name -> (B, C) channel gates
    spatial: dict  # name -> (B, h, w) spatial gates at the module's own resolution
    gradcam: Tensor  # (B, H, W) in [0, 1], at the input's resolution


def cbam_modules(model: nn.Module, all_blocks: bool = False) -> list:
    """(name, CBAM) pairs in forward order: placement=stage gives layer1..layer4; placement=block gives each
    stage's last block (layer1.1 .. layer4.1), or all 8 blocks with all_blocks."""
    stage = getattr(model, "cbam", None)
    if isinstance(stage, nn.ModuleDict):
        return [(name, stage[name]) for name in stage]
    found = []
    for k in range(1, 5):
        blocks = [(f"layer{k}.{i}", b.cbam) for i, b in enumerate(getattr(model, f"layer{k}"))
                  if isinstance(getattr(b, "cbam", None), CBAM)]
        found += blocks if all_blocks else blocks[-1:]
    return found


def cam_layer(model: nn.Module) -> nn.Module:
    """Where Grad-CAM looks: the features the classifier pools, i.e. layer4's last block's output after its
    attention (placement=block: the block itself holds its CBAM; placement=stage: the layer4 CBAM after it)."""
    stage = getattr(model, "cbam", None)
    # cast: nn.Module types its submodule attributes as Tensor | Module; layer4 is an nn.Sequential of blocks
    return stage["layer4"] if isinstance(stage, nn.ModuleDict) else cast(nn.Sequential, model.layer4)[-1]


def inspect(model: nn.Module, x: Tensor, all_blocks: bool = False) -> Attention:
    """Run x (normalised, (B, 3, H, W)) through the model in eval mode; collect gates and Grad-CAM.
    The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    captured: dict = {}
    hooks = []
    for name, module in cbam_modules(model, all_blocks):
        hooks.append(module.channel.register_forward_hook(_keep(captured, ("channel", name))))
        hooks.append(module.spatial.register_forward_hook(_keep(captured, ("spatial", name))))
    hooks.append(cam_layer(model).register_forward_hook(_track_grad(captured)))
    try:
        with torch.enable_grad():
            x = x.clone() if x.is_inference() else x
            logits = model(x).float()
            pred = logits.argmax(1)
            score = logits.gather(1, pred[:, None]).sum()
            (grads,) = torch.autograd.grad(score, captured["layer4"])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    cam = grad_cam(captured["layer4"].detach().float(), grads.float(), tuple(x.shape[-2:]))
    channel = {k[1]: v.flatten(1) for k, v in captured.items() if k[0] == "channel"}
    spatial = {k[1]: v[:, 0] for k, v in captured.items() if k[0] == "spatial"}
    return Attention(logits.detach().softmax(1), pred, channel, spatial, cam)


def _keep(store: dict, key: tuple):
    def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        store[key] = output.detach().float()
    return hook


def _track_grad(store: dict):
    """Keep the pooled features for Grad-CAM; when everything before them is frozen they carry no graph: start one."""
    def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Optional[Tensor]:
        if not output.requires_grad:
            output = output.detach().requires_grad_()
        store["layer4"] = output
        return output
    return hook


def grad_cam(activations: Tensor, grads: Tensor, size: tuple) -> Tensor:
    """Grad-CAM (Selvaraju et al., 2017) as pytorch-grad-cam 1.5 computes it: channel weights = the gradient's
    spatial mean, cam = ReLU(sum_c w_c A_c), scaled per image to [0, 1], resized bilinearly (cv2.resize's
    INTER_LINEAR: half-pixel centres, edges clamped), scaled to [0, 1] again.
    activations, grads: (B, C, h, w); size: (H, W). Returns (B, H, W)."""
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = (weights * activations).sum(1).clamp_min(0)
    cam = F.interpolate(_unit_range(cam)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return _unit_range(cam)


def _unit_range(maps: Tensor) -> Tensor:
    """Per map (B, h, w): (m - min) / (max - min + 1e-7), as pytorch-grad-cam's scale_cam_image."""
    maps = maps - maps.flatten(1).amin(1).view(-1, 1, 1)
    return maps / (maps.flatten(1).amax(1).view(-1, 1, 1) + 1e-7)


def upsample(maps: Tensor, size: tuple) -> Tensor:
    """(B, h, w) maps to (B, H, W), bilinear (half-pixel centres), for an overlay on the input."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def drift(gates: Tensor) -> float:
    """Mean |gate - 1| over every value: 0 exactly for a pass-through (init=identity before training)."""
    return float((gates.double() - GATE_REFERENCE).abs().mean()) if gates.numel() else 0.0


def concentration(maps: Tensor) -> Tensor:
    """Per map (B, h, w): 1 - H(p) / log(h w), p the map normalised to sum 1. 0: flat (attends everywhere
    equally); 1: all of the map's mass on one position."""
    p = maps.flatten(1).double().clamp_min(0)
    n = p.shape[1]
    if n < 2:
        return torch.zeros(p.shape[0], dtype=torch.float64)
    p = p / p.sum(1, keepdim=True).clamp_min(1e-300)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(1)
    return (1 - entropy / math.log(n)).clamp(0, 1)


def above_mean_mass(maps: Tensor) -> Tensor:
    """ReLU(map - its mean), per map (B, h, w): where a map attends more than on average, and by how much."""
    return (maps - maps.flatten(1).mean(1).view(-1, 1, 1)).clamp_min(0)


def summarise(att: Attention, labels: Tensor, classes: list, init: str) -> dict:
    """attention.json's numbers: per module the gates' drift, mean and spread, the channel-gate histogram and the
    spatial maps' concentration per (true) class; Grad-CAM's concentration per class."""
    labels = labels.cpu()

    def per_class(values: Tensor) -> dict:
        return {c: (float(values[labels == i].mean()) if (labels == i).any() else None)
                for i, c in enumerate(classes)}

    modules = []
    for name, gates in att.channel.items():
        spatial = att.spatial[name].cpu()
        counts = torch.histc(gates.cpu().clamp(0, 2), bins=HIST_BINS, min=0.0, max=2.0)
        modules.append({
            "name": name, "channels": gates.shape[1], "map_size": list(spatial.shape[1:]),
            "channel_drift": drift(gates), "channel_gate_mean": float(gates.mean()),
            "channel_gate_std": float(gates.std()) if gates.numel() > 1 else 0.0,
            "spatial_drift": drift(spatial), "spatial_gate_mean": float(spatial.mean()),
            "spatial_concentration": per_class(concentration(spatial)),
            "channel_hist": {"min": 0.0, "max": 2.0, "counts": [int(c) for c in counts.tolist()]},
        })
    return {"init": init, "reference": GATE_REFERENCE, "reference_means": reference_note(init),
            "modules": modules, "gradcam_concentration": per_class(concentration(att.gradcam.cpu()))}


def reference_note(init: str) -> str:
    """What drift = mean |gate - 1| measures under each init."""
    if init == "identity":
        return ("init=identity: every gate starts at exactly 1 (a pass-through), so the drift is what the module "
                "has learned")
    return ("init=seed: gates are plain sigmoids and start near 0.5, not 1; the drift is the distance from a "
            "pass-through and includes the ~0.5 the init already removes, not only what was learned")


def stratified_pick(targets, per_class: int, num_classes: int) -> list:
    """The first `per_class` positions of each class in split order (a fixed set for a split), class by class."""
    picked = []
    for c in range(num_classes):
        picked += [i for i, t in enumerate(targets) if int(t) == c][:per_class]
    return picked
