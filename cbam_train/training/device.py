"""Where and how the steps run: the device, seeding, precision (autocast dtype, fp16 loss scaling, memory
format) and torch.compile. Shared by training, evaluation and the benchmark."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional, cast

import numpy as np
import torch
from torch import nn

from cbam_train.config.errors import UserError
from cbam_train.config.schema import DeviceConfig


@dataclass
class Amp:
    """How a step runs: autocast dtype (None: fp32), fp16 loss scaler, memory format of the inputs."""

    name: str = "fp32"
    dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None
    memory_format: torch.memory_format = torch.contiguous_format


def resolve_amp(cfg: DeviceConfig, device: torch.device) -> Amp:
    """device.precision / device.channels_last for this device (auto: bf16 + channels_last on CUDA)."""
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    elif precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(f"device.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                        "use device.precision=fp16 or fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    return Amp(precision, dtype, scaler, torch.channels_last if channels_last else torch.contiguous_format)


def setup_device(model: nn.Module, cfg: DeviceConfig, device: torch.device) -> Amp:
    """Move the model (in the configured memory format), set cuDNN autotuning; the Amp for the steps."""
    amp = resolve_amp(cfg, device)
    # torch's overloads of Module.to omit (device, memory_format), which it accepts at runtime
    model.to(device, memory_format=amp.memory_format)  # type: ignore[call-overload]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    return amp


def compile_for_stage(model: nn.Module, cfg: DeviceConfig) -> nn.Module:
    """torch.compile afresh for a stage: guards do not track requires_grad changes (pytorch#139476),
    so a graph compiled while a layer was frozen would keep skipping its gradients."""
    torch._dynamo.reset()
    # torch.compile's stubs return a Callable; given a Module it returns an OptimizedModule (a Module)
    return cast(nn.Module, torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode,
                                         backend=cfg.compile_backend))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(name: str) -> torch.device:
    """device.name -> torch.device; auto picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name}: CUDA is not available on this machine; use device=cpu or device=auto")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device.name={name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
