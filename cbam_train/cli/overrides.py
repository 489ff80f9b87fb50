"""The command line of a run: which config key an override sets, and the overrides that re-create a run's
config, so `cbam-train resume=RUN_DIR` (and `task=eval checkpoint=PATH`) need nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from cbam_train.config.errors import UserError

# Recorded overrides that never carry over into a resumed (or evaluated) run's command line.
NOT_CARRIED = ("resume", "checkpoint", "task", "hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir")


def override_key(override: str) -> str:
    """The config key an override sets: '+a.b=1' -> 'a.b', '~x' -> 'x'."""
    return override.lstrip("~+").split("=", 1)[0].strip()


def recorded_overrides(run_dir: Optional[Path], ckpt: Optional[Path], key: str = "resume") -> list:
    """The overrides a run was started with: its .hydra/overrides.yaml, else the checkpoint's copy. For
    resume= the file must be a cbam-train checkpoint; for checkpoint= (task=eval) a plain state dict has none."""
    from omegaconf import OmegaConf

    if run_dir is not None:
        return [str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]
    if ckpt is not None and ckpt.is_file():
        from cbam_train.state.run_state import saved_overrides
        from cbam_train.state.weights import load_checkpoint, read_weights

        if key == "resume":
            return saved_overrides(load_checkpoint(ckpt, f"resume={ckpt}"))
        return saved_overrides(read_weights(ckpt, f"{key}={ckpt}")[1])
    return []


def merge_overrides(recorded: list, given: list) -> list:
    """The run's recorded overrides (minus those `given` sets again, and run-specific ones), then `given`."""
    keys = {override_key(o) for o in given}
    return [o for o in recorded if override_key(o) not in keys and override_key(o) not in NOT_CARRIED] + given


SCHEDULE_FILE = (".yaml", ".yml")


def schedule_files(args: list) -> list:
    """`schedule=PATH.yaml` (a run's schedule.yaml, or any file in conf/schedule/*.yaml's format): each such file
    is registered with Hydra as an option of the schedule group, named by its absolute path, so it composes like
    schedule=seed, in sweeps (-m schedule=a.yaml,seed) and resumes alike. Returns args with those paths absolute.
    Raises UserError naming the file when it is missing or not a YAML mapping."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    out = []
    for arg in args:
        if arg.startswith("-") or override_key(arg) != "schedule" or "=" not in arg:
            out.append(arg)
            continue
        values = []
        for value in arg.split("=", 1)[1].split(","):
            value = value.strip().strip("'\"")
            if value.endswith(SCHEDULE_FILE):
                path = Path(value).expanduser().resolve()
                if not path.is_file():
                    raise UserError(f"schedule={value}: no such file (a schedule file ends in .yaml; the built-in "
                                    "ones are named without it: schedule=seed)")
                try:
                    node = OmegaConf.load(path)
                except Exception as e:  # a YAML syntax error, an unreadable file: the user's file, one line
                    raise UserError(f"schedule={value}: not readable as YAML ({str(e).splitlines()[0]})") from None
                if not isinstance(node, DictConfig):
                    raise UserError(f"schedule={value}: expected a mapping with name, freeze_bn and stages")
                ConfigStore.instance().store(group="schedule/" + str(path.parent).strip("/"), name=path.name,
                                             node=node)
                value = str(path)
            values.append(value)
        out.append(f"{arg.split('=', 1)[0]}={','.join(values)}")
    return out
