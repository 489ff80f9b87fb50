"""Weights and checkpoint files in and out: weights-only loads, the checkpoint envelope (format and
version), the background writer, ImageNet weights through torchvision's cache. What a checkpoint holds
is run_state.py's business."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from cbam_train.config.errors import CheckpointError, WeightsError
from cbam_train.models.post import from_post, is_post_layout
from cbam_train.state.atomic import atomic_save, link_or_copy

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
CHECKPOINT_FORMAT = "cbam-train-checkpoint"
CHECKPOINT_VERSION = 1  # bump when run_state.py's layout changes; load_checkpoint refuses every other version


def load_checkpoint(path: str | Path, what: str = "resume") -> dict:
    """A full cbam-train checkpoint (weights_only: unpickling cannot run code), checked for format and version."""
    path = Path(path)
    obj = _load_untrusted(path, what, "checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{what}: {path} is not a cbam-train checkpoint (a plain state dict? "
                           "use init_from=PATH to start a new run from its weights)")
    version = obj.get("version", 0)
    if version > CHECKPOINT_VERSION:
        raise WeightsError(f"{what}: {path} has checkpoint format version {version}; this cbam-train reads "
                           f"up to {CHECKPOINT_VERSION}: upgrade cbam-train")
    if version < CHECKPOINT_VERSION:
        raise WeightsError(f"{what}: {path} has checkpoint format version {version}, older than this cbam-train's "
                           f"{CHECKPOINT_VERSION}, so it cannot be resumed; start a new run from its weights with "
                           f"init_from={path}")
    return obj


def _first_line(e: BaseException) -> str:
    """The reason a load failed, in one line. torch's weights-only refusal suggests weights_only=False, which
    would run whatever the file holds: keep only what it found ('unsupported GLOBAL posix.system ...')."""
    text = str(e).strip()
    if text.startswith("Weights only load failed"):
        found = [ln.strip() for ln in text.splitlines()[1:] if ln.strip() and not ln.startswith(
            ("Please file an issue", "Check the documentation", "Re-running")) and "WeightsUnpickler error" not in ln]
        detail = found[0] if found else "it holds objects other than tensors"
        return f"refused by the weights-only loader, nothing in it was run: {detail}"[:200]
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _load_untrusted(path: Path, what: str, kind: str) -> Any:
    """torch.load with weights_only=True: a file whose unpickling would run code is refused, nothing runs."""
    if not path.is_file():
        raise WeightsError(f"{what}: file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbage, or a pickle that would run code: all bad input, not a bug
        raise WeightsError(f"{what}: {path} is not a readable {kind} ({_first_line(e)})") from None


def read_weights(path: str | Path, what: str = "weights") -> tuple:
    """(state dict, checkpoint or None) from a plain state dict, a cbam-train checkpoint (the second value,
    without its model), a file holding one under 'model'/'state_dict', torchvision's file, or the tutorial
    post's (its names mapped onto ours, models/post.py)."""
    path = Path(path)
    obj = _load_untrusted(path, what, "PyTorch weights file")
    ckpt = None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        ckpt = {k: v for k, v in obj.items() if k != "model"}
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{what}: {path} does not hold a state dict (name -> tensor)")
    state = strip_wrapper_prefixes(obj)
    return (from_post(state) if is_post_layout(state) else state), ckpt


def strip_wrapper_prefixes(state: dict) -> dict:
    """torchvision's key names: 'module.' (DDP, AveragedModel) and '_orig_mod.' (torch.compile) removed."""
    out = {}
    for k, v in state.items():
        while k.startswith(WRAPPER_PREFIXES):  # e.g. _orig_mod.module.x from compile(DDP(model))
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def load_state_dict_file(path: str | Path, what: str = "weights") -> dict:
    """The state dict in a weights file or checkpoint (see read_weights)."""
    return read_weights(path, what)[0]


@dataclass
class LoadReport:
    loaded: list = field(default_factory=list)  # keys copied into the model
    mismatched: list = field(default_factory=list)  # keys present in both with different shapes
    unexpected: list = field(default_factory=list)  # keys in the file the model does not have
    new_modules: list = field(default_factory=list)  # top-level modules (and 'cbam') left at their init


def group_of(key: str) -> str:
    """The module a state-dict key belongs to, at the granularity the schedule uses."""
    return "cbam" if "cbam" in key.split(".") else key.split(".")[0]


def load_matching(model: nn.Module, state: dict) -> LoadReport:
    """Copy every tensor whose name and shape match; report what was left at its initialisation.

    Used for pretrained / `model.weights` files, where a new stem, head and CBAM are expected to differ.
    """
    own = model.state_dict()
    report = LoadReport()
    take = {}
    for k, v in state.items():
        if k not in own:
            report.unexpected.append(k)
        elif own[k].shape != v.shape:
            report.mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
        else:
            take[k] = v
    model.load_state_dict(take, strict=False)
    report.loaded = sorted(take)
    report.new_modules = unfilled_modules(own, take)
    return report


def unfilled_modules(own: dict, taken: dict) -> list:
    """The modules (group_of: top-level names and 'cbam'), in model order, with a tensor of `own` (a model's state
    dict) that `taken` does not fill. num_batches_tracked is bookkeeping: older ResNet files lack it."""
    new: list = []
    for k in own:
        if k not in taken and not k.endswith("num_batches_tracked") and group_of(k) not in new:
            new.append(group_of(k))
    return new


def with_stem_bn(modules: list, present: Sequence[str] = ()) -> list:
    """`modules` and bn1 when they hold a new conv1 (bn1 in neither them nor `present`): a loaded bn1's statistics
    and affine describe the old stem's output (ImageNet's 7x7 conv), not the new conv1's."""
    return modules + ["bn1"] if "conv1" in modules and "bn1" not in [*modules, *present] else modules


def new_modules_of(model: nn.Module, weights: Optional[str], pretrained: bool, init_from: Optional[str]) -> list:
    """The modules the initial weights leave at their init, without loading anything into `model`: none under
    init_from (it fills every tensor), every module when no weights file is asked for."""
    own = model.state_dict()
    if init_from:
        return []
    if not weights and not pretrained:
        return unfilled_modules(own, {})
    state = load_state_dict_file(weights, "model.weights") if weights else imagenet_resnet18_state_dict()
    return unfilled_modules(own, {k: v for k, v in state.items() if k in own and own[k].shape == v.shape})


def _summarise(keys: list, n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_strict(model: nn.Module, state: dict, source: str) -> None:
    """Load every key or fail naming the missing, unexpected and mis-shaped keys (for init_from)."""
    refuse_other_width(model, state, source)  # else every conv and BatchNorm would be listed below
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label}: {_summarise(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", shapes)) if keys]
        raise WeightsError(f"{source} does not fit this model ({'; '.join(parts)}); "
                           "build the model with the config that saved it")
    model.load_state_dict(state)


def imagenet_resnet18_state_dict(progress: bool = False) -> dict:
    """torchvision's ResNet18_Weights.IMAGENET1K_V1, from the TORCH_HOME cache or downloaded into it."""
    from torchvision.models import ResNet18_Weights

    url = ResNet18_Weights.IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            digest = torch.hub.HASH_REGEX.search(path.name)  # torchvision names files <name>-<sha256 prefix>.pth
            torch.hub.download_url_to_file(url, str(path), hash_prefix=digest.group(1) if digest else None,
                                           progress=progress)
        except Exception as e:  # URLError, OSError, a hash mismatch, a truncated read: all mean "not available"
            reason = getattr(e, "reason", None) or e
            raise WeightsError(
                f"model.pretrained: ImageNet weights are not cached at {path} and the download failed "
                f"({reason}); copy {path.name} there, pass model.weights=PATH, or set model.pretrained=false"
            ) from None
    return load_state_dict_file(path, "model.pretrained")


def width_of(state: dict) -> Optional[int]:
    """The model.width a state dict was saved at (bn1's channels), or None when it has no bn1."""
    bn1 = state.get("bn1.weight")
    return int(bn1.shape[0]) if isinstance(bn1, torch.Tensor) and bn1.dim() == 1 else None


def refuse_other_width(model: nn.Module, state: dict, source: str) -> None:
    """Raise WeightsError naming both widths and the fix when `state` was saved at another model.width."""
    file_width, own_width = width_of(state), width_of(model.state_dict())
    if file_width is not None and own_width is not None and file_width != own_width:
        raise WeightsError(f"{source} does not fit this model: the file holds a model.width={file_width} network, "
                           f"this model has model.width={own_width}: set model.width={file_width}")


def load_initial_weights(model: nn.Module, weights: Optional[str], pretrained: bool) -> Optional[LoadReport]:
    """Apply `model.weights` (a file) or `model.pretrained` (ImageNet); None when neither is asked for."""
    if weights:
        state = load_state_dict_file(weights, "model.weights")
        # ImageNet's and the post's files are 64 wide; a model of another width would take only shape-free keys
        refuse_other_width(model, state, f"model.weights: {weights}")
        report = load_matching(model, state)
        if not report.loaded:
            raise WeightsError(f"model.weights: no tensor in {weights} matches this model by name and shape "
                               f"(e.g. {', '.join((report.unexpected + report.mismatched)[:3])}); is it a ResNet18?")
        return report
    if pretrained:
        return load_matching(model, imagenet_resnet18_state_dict())
    return None


def save_checkpoint(state: dict, folder: Path, names: list, resume_hint: str) -> None:
    """Write state atomically as folder/names[0]; names[1:] become links to (or copies of) it."""
    first = Path(folder) / names[0]
    try:
        atomic_save(state, first)
        for name in names[1:]:
            link_or_copy(first, first.with_name(name))
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {first} ({e.strerror or e}); the previous checkpoint is "
                              f"intact: free space and resume with: {resume_hint}") from None


def cpu_snapshot(obj: Any, contiguous: bool = False) -> Any:
    """obj with every tensor copied to the CPU: a snapshot training can no longer change. contiguous=True also
    turns channels_last tensors into the default layout (model.pt)."""
    if isinstance(obj, torch.Tensor):
        layout = torch.contiguous_format if contiguous else torch.preserve_format
        return obj.detach().to("cpu", copy=True, memory_format=layout)
    if isinstance(obj, dict):
        return {k: cpu_snapshot(v, contiguous) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_snapshot(v, contiguous) for v in obj)
    return obj
