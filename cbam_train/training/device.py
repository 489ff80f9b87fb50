"""Where and how the steps run: the device, seeding, precision (autocast dtype, fp16 loss scaling, memory
format) and torch.compile. Shared by training, evaluation and the benchmark."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, cast

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
    """CPUs this process may use: its CPU share (cpu_share)."""
    return cpu_share()[0]


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")  # which cgroup this process is in: "0::/<path>" (v2), "N:cpu,...:/<path>"


def cpu_share(environ: Optional[Mapping[str, str]] = None, cgroup_root: Optional[Path] = None,
              proc_cgroup: Optional[str] = None) -> tuple:
    """(CPUs, where that figure comes from): the fewest of the CPUs this process may run on (its affinity
    mask), a SLURM job's SLURM_CPUS_PER_TASK and a cgroup CPU quota (its own cgroup's or a parent's, rounded up
    to whole CPUs), so that jobs sharing a node do not each start a thread per core. `cgroup_root` and
    `proc_cgroup` stand in for /sys/fs/cgroup and /proc/self/cgroup's text (tests)."""
    environ = os.environ if environ is None else environ
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limits = [(affinity, "CPU affinity")]
    slurm = environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        limits.append((int(slurm), f"SLURM_CPUS_PER_TASK={slurm}"))
    quota = _cgroup_quota(CGROUP_ROOT if cgroup_root is None else cgroup_root, proc_cgroup)
    if quota is not None:
        limits.append(quota)
    tightest = limits[0]
    for limit in limits[1:]:  # a tie goes to the more specific limit: SLURM's over the mask, a quota over both
        tightest = limit if limit[0] <= tightest[0] else tightest
    return tightest


def _cgroup_quota(root: Path, proc_cgroup: Optional[str]) -> Optional[tuple]:
    """The smallest CPU quota on the way from this process's cgroup up to the root, as (CPUs, source)."""
    try:
        text = PROC_CGROUP.read_text() if proc_cgroup is None else proc_cgroup
    except OSError:
        text = ""
    found = []
    for line in text.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: <root>/<path>/cpu.max, "<quota> <period>" or "max <period>"
            folders, name = _up(root, path), "cpu.max"
        elif "cpu" in controllers.split(","):  # v1: <root>/<controllers>/<path>/cpu.cfs_quota_us, -1: none
            folders, name = _up(root / controllers, path) + _up(root / "cpu", path), "cpu.cfs_quota_us"
        else:
            continue
        for folder in folders:
            quota = _read_quota(folder, name)
            if quota is not None:
                found.append(quota)
    return min(found, key=lambda q: q[0]) if found else None


def _up(base: Path, path: str) -> list:
    """base/path and each of its parents up to base."""
    parts = [p for p in path.strip("/").split("/") if p]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _read_quota(folder: Path, name: str) -> Optional[tuple]:
    try:
        if name == "cpu.max":
            quota, period = (folder / name).read_text().split()[:2]
            if quota == "max":
                return None
            return max(1, math.ceil(int(quota) / int(period))), f"cgroup cpu.max {quota} {period}"
        quota_us = int((folder / name).read_text())
        if quota_us <= 0:
            return None
        period_us = int((folder / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota_us / period_us)), "cgroup cpu.cfs_quota_us"
    except (OSError, ValueError):  # no such file here, or unexpected content: no quota we can honour
        return None


def set_threads(requested: Optional[int], environ: Optional[Mapping[str, str]] = None) -> str:
    """torch's intra-op threads: device.threads when set, else OMP_NUM_THREADS when set (torch read it at
    start), else the CPU share. Returns what the data line says, e.g. '2 threads (SLURM_CPUS_PER_TASK=2)'."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        torch.set_num_threads(requested)
        return f"{requested} thread(s) (device.threads)"
    if environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} thread(s) (OMP_NUM_THREADS)"
    cpus, source = cpu_share(environ)
    torch.set_num_threads(cpus)
    return f"{cpus} thread(s) ({source})"
