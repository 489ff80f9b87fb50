"""Whether a checkpoint may continue in this run: the resume=PATH lookup, which config changes a resume
may make, and whether the data is still the same. What the checkpoint holds is run_state.py's."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from cbam_train.config.errors import ConfigError, UserError
from cbam_train.config.schema import Config
from cbam_train.config.view import UNSET, config_changes, flatten
from cbam_train.state.run_state import RunState, describe
from cbam_train.state.rundir import run_dir_of
from cbam_train.state.weights import load_checkpoint

# A resume that changes one of these would continue a different model or different data: refused.
# (model.pretrained / model.weights only choose the starting weights, which a resume takes from the checkpoint.)
REFUSED = ("model.name", "model.num_classes", "model.stem", "model.width", "model.cbam.", "data.name", "data.root",
           "data.image_size", "data.num_classes", "data.train_size", "data.test_size", "data.val_size", "data.limit",
           "data.mean", "data.std", "data.bad_images", "seed")
# Changing these does not change a single number of the run.
HARMLESS = ("log.", "bench.", "eval.split", "task", "resume", "checkpoint", "init_from", "experiment",
            "model.pretrained", "model.weights", "data.download", "data.num_workers", "data.memory_budget_mb",
            "train.checkpoint_every_n_epochs", "train.checkpoint_every_n_steps", "sweep.", "logger.", "lr_find.",
            "predict.", "export.", "explain.", "inputs")


def _in(key: str, patterns: tuple) -> bool:
    """key is one of the patterns, or under one ending in '.'."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def resume_changes(old: dict, new: dict) -> tuple:
    """(refused, other) lists of 'key: old -> new' between a checkpoint's config and the resuming one;
    harmless keys are left out of both."""
    a, b = flatten(old), flatten(new)
    # a key the checkpoint's cbam-train did not have yet (model.width, ...) ran at the schema's default
    defaults = flatten(asdict(Config()))
    a = {**{k: v for k, v in defaults.items() if k in b and k not in a}, **a}
    refused: list[str] = []
    other: list[str] = []
    for key, now, was in sorted(config_changes(b, a), key=lambda change: change[0]):
        if _in(key, HARMLESS):
            continue
        line = f"{key}: {_shown(was)} -> {_shown(now)}"
        (refused if _in(key, REFUSED) else other).append(line)
    return refused, other


def _shown(value: object) -> str:
    return "<unset>" if value is UNSET else str(value)


def check_resume_config(old: dict, new: dict, source: str) -> list:
    """Raise ConfigError if the resume changes the model or the data; return the other changes (to warn about)."""
    refused, other = resume_changes(old, new)
    if refused:
        raise ConfigError(f"resume: this config changes the model or the data of {source} ({'; '.join(refused)}); "
                          "resume with the run's own settings, or start a new run (init_from=... takes its weights)")
    return other


def check_resume_data(saved: dict, now: dict, source: str) -> None:
    """Refuse a resume whose data came out different (files added or removed, other classes)."""
    diffs = [f"{k}: {saved.get(k)} -> {now.get(k)}" for k in ("classes", "n_train", "n_val")
             if saved.get(k) != now.get(k)]
    diffs += [f"{k}: differs" for k in ("mean", "std")
              if saved.get(k) is not None and now.get(k) is not None
              and max(abs(a - b) for a, b in zip(saved[k], now[k], strict=False)) > 1e-6]
    if diffs:
        raise UserError(f"resume: the data differs from what {source} was trained on ({'; '.join(diffs)}); "
                        "resume with the same data, or start a new run")


def check_resume(state: RunState, config: dict, data: dict, world: int, source: str,
                 warn: Callable[[str], None]) -> None:
    """Refuse a resume with another model, data or process count; warn about the other changed settings."""
    changed = check_resume_config(state.saved_config, config, source)
    if changed:
        warn(f"resuming with changed settings, so results will differ from an uninterrupted run: "
             f"{'; '.join(changed)}")
    check_resume_data(state.saved_data, data, source)
    if state.saved_world != world:
        raise UserError(f"resume: {source} was written by {state.saved_world} process(es); resume it with "
                        f"as many (torchrun --nproc_per_node=N), or start a new run with init_from=...")


@dataclass
class Resume:
    """Where a resumed run picks up: its checkpoint's state (None: the run had written none yet, so it starts
    over in the same run dir) and the run dir it belongs to (None: a checkpoint file outside any run dir)."""

    state: Optional[RunState]
    path: Optional[Path]
    run_dir: Optional[Path]

    def describe(self) -> str:
        if self.state is None:
            return f"{self.run_dir} has no checkpoint yet: starting the run again from the beginning"
        return f"resuming from {self.path} ({describe(self.state)})"


def find_resume(resume: Optional[str]) -> Optional[Resume]:
    """resume=PATH -> the checkpoint to continue from: PATH/checkpoints/last.pt for a run dir, or PATH itself."""
    if not resume:
        return None
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
    return Resume(RunState.from_checkpoint(load_checkpoint(path, f"resume={resume}")), path, run_dir)
