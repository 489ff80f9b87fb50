"""Exact resume: the random state a checkpoint must carry, which config changes a resume may make, and
the command-line overrides that re-create a run's config (so `cbam-train resume=RUN_DIR` needs nothing else)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from cbam_train import distributed
from cbam_train.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, BackgroundSaver
from cbam_train.distributed import Dist
from cbam_train.config import ConfigError, UserError

# A resume that changes one of these would continue a different model or different data: refused.
# (model.pretrained / model.weights only choose the starting weights, which a resume takes from the checkpoint.)
REFUSED = ("model.name", "model.num_classes", "model.stem", "model.cbam.", "data.name", "data.root",
           "data.image_size", "data.num_classes", "data.train_size", "data.test_size", "data.val_size", "data.limit",
           "data.mean", "data.std", "data.bad_images", "seed")
# Changing these does not change a single number of the run.
HARMLESS = ("log.", "bench.", "eval.split", "task", "resume", "checkpoint", "init_from", "experiment",
            "model.pretrained", "model.weights", "data.download", "data.num_workers", "data.memory_budget_mb",
            "train.checkpoint_every_n_epochs", "train.checkpoint_every_n_steps", "sweep.", "logger.")
# Recorded overrides that never carry over into a resumed (or evaluated) run's command line.
NOT_CARRIED = ("resume", "checkpoint", "task", "hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir")


def capture_rng(loader_generators: tuple = ()) -> dict:
    """Every random state a training step can draw from: python, numpy, torch CPU and CUDA, the data's generators."""
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            # numpy's state as tensors and numbers: a weights_only load cannot read numpy arrays
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader": [g.get_state() for g in loader_generators]}


def restore_rng(state: dict, loader_generators: tuple = ()) -> None:
    """Put back what capture_rng saved (CUDA states only when this machine has as many devices)."""
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if len(state["loader"]) != len(loader_generators):
        raise UserError(f"resume: the checkpoint holds {len(state['loader'])} data generator state(s), this run has "
                        f"{len(loader_generators)}; resume with the same data.loader and number of processes")
    for g, st in zip(loader_generators, state["loader"]):
        try:
            g.set_state(st)
        except RuntimeError:  # a CUDA generator's state does not fit a CPU one, and the other way round
            raise UserError(f"resume: the checkpoint's data generator comes from another kind of device than "
                            f"this run's {g.device.type}; resume on the device type it was trained on "
                            "(device=...), or start a new run with init_from=...") from None


def _tuples(x: Any) -> Any:
    """random.setstate wants tuples; a saved state may come back with lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _matches(key: str, patterns: tuple) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def config_changes(old: dict, new: dict) -> tuple:
    """(refused, other) lists of 'key: old -> new' between a checkpoint's config and the resuming one;
    harmless keys are left out of both."""
    a, b = flatten(old), flatten(new)
    refused, other = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") == b.get(key, "<unset>") or _matches(key, HARMLESS):
            continue
        line = f"{key}: {a.get(key, '<unset>')} -> {b.get(key, '<unset>')}"
        (refused if _matches(key, REFUSED) else other).append(line)
    return refused, other


def check_resume_config(old: dict, new: dict, source: str) -> list:
    """Raise ConfigError if the resume changes the model or the data; return the other changes (to warn about)."""
    refused, other = config_changes(old, new)
    if refused:
        raise ConfigError(f"resume: this config changes the model or the data of {source} ({'; '.join(refused)}); "
                          "resume with the run's own settings, or start a new run (init_from=... takes its weights)")
    return other


def override_key(override: str) -> str:
    """The config key an override sets: '+a.b=1' -> 'a.b', '~x' -> 'x'."""
    return override.lstrip("~+").split("=", 1)[0].strip()


def run_dir_of(path: Path) -> Optional[Path]:
    """The run dir a path belongs to: the dir itself, or the run holding checkpoints/X.pt or model.pt."""
    for cand in (path, path.parent.parent if path.parent.name == "checkpoints" else None, path.parent):
        if cand is not None and cand.is_dir() and (cand / ".hydra" / "overrides.yaml").is_file():
            return cand
    return None


def recorded_overrides(run_dir: Optional[Path], ckpt: Optional[Path], key: str = "resume") -> list:
    """The overrides a run was started with: its .hydra/overrides.yaml, else the checkpoint's copy. For
    resume= the file must be a cbam-train checkpoint; for checkpoint= (task=eval) a plain state dict has none."""
    from omegaconf import OmegaConf

    if run_dir is not None:
        return [str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]
    if ckpt is not None and ckpt.is_file():
        from cbam_train.checkpoint import load_checkpoint, read_weights

        if key == "resume":
            return [str(o) for o in load_checkpoint(ckpt, f"resume={ckpt}").get("overrides", [])]
        meta = read_weights(ckpt, f"{key}={ckpt}")[1]
        return [str(o) for o in (meta or {}).get("overrides", [])]
    return []


def merge_overrides(recorded: list, given: list) -> list:
    """The run's recorded overrides (minus those `given` sets again, and run-specific ones), then `given`."""
    keys = {override_key(o) for o in given}
    return [o for o in recorded if override_key(o) not in keys and override_key(o) not in NOT_CARRIED] + given


def checkpoint_names(epoch: int, every: int, stage, new_best: bool) -> list:
    """Files an epoch end writes: last.pt every `every` epochs, at the stage's end and on a new best (then
    also best.pt), stage<k>-<name>.pt at the stage's end; none when every=0."""
    stage_end = epoch == stage.last_epoch
    if not every or not (epoch % every == 0 or stage_end or new_best):
        return []
    return ["last.pt"] + ["best.pt"] * new_best + [f"stage{stage.index}-{stage.name}.pt"] * stage_end


class RunSaver:
    """Writes checkpoints of the run: what goes in them and where; remembers the last one for messages."""

    def __init__(self, cfg: Any, overrides: list, run_dir: Path, model: nn.Module, scaler: Any, data: dict,
                 dist: Dist) -> None:
        self.cfg, self.overrides, self.model, self.scaler = cfg, overrides, model, scaler
        self.data, self.dist = data, dist
        self.folder, self.hint = run_dir / "checkpoints", f"cbam-train resume={run_dir}"
        self.last: Optional[str] = None  # "epoch 3" / "epoch 4 step 20", for messages
        self.writer = BackgroundSaver()

    def __call__(self, names: list, opt: torch.optim.Optimizer, stage: Any, epoch: int, partial: Any, rng: dict,
                 history: list, best_val: Optional[float], extras: Any) -> None:
        """Every rank calls this at the same point (the random states of all ranks go into the file);
        rank 0 writes it, on a background thread."""
        ranks_rng = distributed.gather(rng, self.dist)
        ranks_partial = distributed.gather(partial.to_dict() if partial is not None else None, self.dist)
        self.last = f"epoch {epoch}" + (f" + {partial.step} step(s) of epoch {epoch + 1}" if partial else "")
        if not self.dist.is_main:
            return
        state = make_checkpoint(self.cfg, self.overrides, self.model, opt, self.scaler, stage, epoch, partial, rng,
                                history, best_val, self.data, extras.scheduler, extras.ema)
        state.update(world=self.dist.world, rng_ranks=ranks_rng, partial_ranks=ranks_partial)
        self.writer.save(state, self.folder, names, self.hint)


@dataclass
class Resume:
    """Where a resumed run picks up: its checkpoint (None: the run had written none yet, so it starts over in
    the same run dir) and the run dir it belongs to (None: a checkpoint file outside any run dir)."""

    ckpt: Optional[dict]
    path: Optional[Path]
    run_dir: Optional[Path]

    def describe(self) -> str:
        if self.ckpt is None:
            return f"{self.run_dir} has no checkpoint yet: starting the run again from the beginning"
        where = f"epoch {self.ckpt['epoch']} done" + (f", step {self.ckpt['step']} of epoch {self.ckpt['epoch'] + 1}"
                                                       if self.ckpt["step"] else "")
        return f"resuming from {self.path} ({where}, stage '{self.ckpt['stage_name']}')"


def find_resume(resume: Optional[str]) -> Optional[Resume]:
    """resume=PATH -> the checkpoint to continue from: PATH/checkpoints/last.pt for a run dir, or PATH itself."""
    if not resume:
        return None
    from cbam_train.checkpoint import load_checkpoint

    path = Path(resume).expanduser()
    if not path.exists():
        raise UserError(f"resume={resume}: no such run dir or checkpoint file")
    run_dir = run_dir_of(path.resolve())
    if path.is_dir():
        if run_dir is None:
            raise UserError(f"resume={resume}: not a cbam-train run dir (no .hydra/overrides.yaml in it)")
        path = path / "checkpoints" / "last.pt"
        if not path.is_file():
            return Resume(None, None, run_dir)
    return Resume(load_checkpoint(path, f"resume={resume}"), path, run_dir)


def make_checkpoint(cfg: Any, overrides: list, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any,
                    stage: Any, epoch: int, partial: Any, rng: dict, history: list, best_val: Optional[float],
                    data: dict, scheduler: Any = None, ema: Optional[nn.Module] = None) -> dict:
    """Everything an exact resume needs. `epoch`: the last finished epoch; `partial`: the EpochState of the
    next one when saved mid-epoch (None at an epoch end); `rng`: the states at the start of that next epoch."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "model": model.state_dict(),  # the writer snapshots every tensor to the CPU once
            "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "stage": stage.index, "stage_name": stage.name, "epoch": epoch,
            "step": partial.step if partial is not None else 0,
            "partial": partial.to_dict() if partial is not None else None,
            "rng": rng, "history": list(history), "best_val_acc": best_val,
            "config": dataclasses.asdict(cfg), "overrides": list(overrides), "data": data}


def check_resume_data(saved: dict, now: dict, source: str) -> None:
    """Refuse a resume whose data came out different (files added or removed, other classes)."""
    diffs = [f"{k}: {saved.get(k)} -> {now.get(k)}" for k in ("classes", "n_train", "n_val")
             if saved.get(k) != now.get(k)]
    diffs += [f"{k}: differs" for k in ("mean", "std")
              if saved.get(k) is not None and now.get(k) is not None
              and max(abs(a - b) for a, b in zip(saved[k], now[k])) > 1e-6]
    if diffs:
        raise UserError(f"resume: the data differs from what {source} was trained on ({'; '.join(diffs)}); "
                        "resume with the same data, or start a new run")
