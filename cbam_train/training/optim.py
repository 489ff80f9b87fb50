"""What updates the weights: the optimizer over a stage's trainable parameters, and the EMA of the weights.
A new optimizer goes into build_optimizer (its name and fields into config.OptimConfig and validation.py)."""

from __future__ import annotations

from typing import Iterable, Optional, cast

import torch
from torch import nn

from cbam_train.config.schema import OptimConfig


def build_optimizer(params: Iterable, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """A fresh optimizer over exactly the given (trainable) parameters, or param groups with their own "lr"
    (schedule.param_groups); fused kernels on CUDA by default."""
    params = list(params)
    first = (params[0]["params"][0] if isinstance(params[0], dict) else params[0]) if params else None
    on_cuda = first is not None and first.is_cuda
    fused = cfg.fused if cfg.fused is not None else (True if on_cuda else None)
    if cfg.name == "adam":
        betas = cast("tuple[float, float]", tuple(cfg.betas))  # validate() checks there are two
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, fused=fused)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}")  # validate() rejects it before this


def build_ema(model: nn.Module, decay: Optional[float]) -> Optional[torch.optim.swa_utils.AveragedModel]:
    """An exponential moving average of the weights and buffers (BatchNorm statistics), or None."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def stage_lr(opt: torch.optim.Optimizer) -> float:
    """The stage's lr as the optimizer applies it now (warm-up and schedule included): the lr of a module with
    multiplier 1.0, whether or not one is in a group."""
    group = opt.param_groups[0]
    return group["lr"] / group.get("lr_mult", 1.0)
