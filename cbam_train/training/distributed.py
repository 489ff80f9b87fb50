"""Data-parallel training under torchrun: process group set-up, which rank writes, and the few
collectives the loop needs (sums of epoch metrics, a shared stop decision, RNG states for checkpoints).

`torchrun --nproc_per_node=N -m cbam_train ...` sets WORLD_SIZE/RANK/LOCAL_RANK; without them
everything here is a no-op and the run is the ordinary single-process one.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cbam_train.config.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """The torchrun rank/world from the environment (a single process without them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(dist: Dist, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); each rank gets cuda:LOCAL_RANK. Returns the device."""
    if not dist.enabled:
        return device
    import torch.distributed as td

    if device.type == "cuda":
        if dist.local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun LOCAL_RANK={dist.local_rank} but this node has {torch.cuda.device_count()} "
                            "CUDA device(s); use --nproc_per_node<=that")
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


def wrap(model: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the parameters that train now. Built afresh for every stage: DDP
    registers the parameters with requires_grad at construction, so an unfrozen layer needs a new wrapper."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_batchnorm(model: nn.Module, dist: Dist, device: torch.device, enabled: bool) -> nn.Module:
    """device.sync_bn: BatchNorm statistics over the global batch (CUDA only, as PyTorch's SyncBatchNorm)."""
    if not (enabled and dist.enabled):
        return model
    if device.type != "cuda":
        raise UserError("device.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm does not run on the CPU); "
                        "set device.sync_bn=false")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def sum_(values: list, dist: Dist, device: torch.device) -> list:
    """Element-wise sum of numbers over the ranks (float64)."""
    if not dist.enabled:
        return list(values)
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t)
    return t.tolist()


def any_(flag: bool, dist: Dist, device: torch.device) -> bool:
    """True on every rank when it is True on any: a decision all ranks must take together (stop, skip)."""
    if not dist.enabled:
        return flag
    return sum_([float(flag)], dist, device)[0] > 0


def gather(obj: Any, dist: Dist) -> list:
    """Every rank's obj, in rank order, on every rank."""
    if not dist.enabled:
        return [obj]
    import torch.distributed as td

    out: list = [None] * dist.world
    td.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (only called under torchrun)."""
    import torch.distributed as td

    td.barrier()


def broadcast(obj: Any, dist: Dist) -> Any:
    """Rank 0's obj on every rank."""
    if not dist.enabled:
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def reduce_epoch(result: Any, dist: Dist, device: torch.device) -> Any:
    """A training epoch's EpochResult with loss, accuracy and counts over all ranks (as is in a single process)."""
    if not dist.enabled:
        return result
    sums = result.state
    loss_sum, correct, seen, skipped = sum_(
        [sums.loss_sum.item(), sums.correct.item(), sums.seen, sums.skipped], dist, device)
    n = max(seen, 1)
    return dataclasses.replace(result, loss=loss_sum / n, acc=correct / n, n=int(seen), skipped=int(skipped))
