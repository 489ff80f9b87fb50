"""`cbam-train`: Hydra composes the config; this file converts it once to typed dataclasses and
hands it to the task. User errors become one red line and exit code 2; tracebacks are for bugs."""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional, cast

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from cbam_train.cli.hydra_errors import condense_hydra_error, failure_line, raised_by_hydra, submission_refused
from cbam_train.cli.launchers import is_main_process, quiet_sacct, requeued_resume, submitit_ranks
from cbam_train.cli.overrides import merge_overrides, override_key, recorded_overrides, schedule_files
from cbam_train.cli.sweep import JobEnd, write_status
from cbam_train.config.errors import UserError
from cbam_train.config.schema import Config
from cbam_train.config.tasks import TASKS, JobInfo
from cbam_train.config.validation import validate
from cbam_train.config.view import ConfigView, config_changes
from cbam_train.reporting.console import CapturedStderr, fail, print_error, release_stderr
from cbam_train.state.rundir import run_dir_of


def find_conf_dir() -> Path:
    """conf/ shipped inside the wheel (cbam_train/conf), else the repo's top-level conf/ (editable install)."""
    package = Path(__file__).resolve().parent.parent  # cbam_train/
    for cand in (package / "conf", package.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise FileNotFoundError(f"cbam-train: config folder not found next to {package}; reinstall the package")


def register_configs() -> None:
    """Register the schema (as `config_schema`, first in conf/config.yaml's defaults) and --help's text (as
    hydra/help=cbam, with the tasks from the registry) with Hydra."""
    ConfigStore.instance().store(name="config_schema", node=Config)
    ConfigStore.instance().store(group="hydra/help", name="cbam", node=help_config())


def help_config() -> dict:
    """`cbam-train --help`: what the tool is, how it is called, the tasks (config/tasks.py), the groups, the
    composed config, where the guide is. $APP_CONFIG_GROUPS and $CONFIG are Hydra's to fill."""
    width = max(len(name) for name in TASKS)
    tasks = "\n".join(f"  task={name:<{width}}  {task.about}" for name, task in TASKS.items())
    header = ("cbam-train: staged fine-tuning of ResNet18 with CBAM attention on CIFAR-10 (downloaded) or any "
              "folder of images in ImageFolder layout (root/train/<class>/*.jpg).\n\n"
              "Usage: cbam-train [group=option ...] [key=value ...]      one run, into outputs/<date>/<time>/\n"
              "       cbam-train -m key=a,b [...]                        a sweep, one job per combination\n"
              "       cbam-train resume=RUN_DIR                          continue a stopped run exactly\n"
              "       cbam-train experiment=smoke                        a 13 s CPU run on generated data\n")
    template = ("${hydra.help.header}\n== Tasks ==\n" + tasks + "\n\n== Configuration groups ==\n"
                "Choose one option per group (group=option)\n\n$APP_CONFIG_GROUPS\n\n"
                "== Config ==\nOverride any key (key=value); the schema's comments say what each one means "
                "(cbam_train/config/schema.py)\n\n$CONFIG\n\n${hydra.help.footer}")
    footer = ("Guide: README.md, docs/ (running, data, fine-tuning, explain, predict-export, scaling, tracking, "
              "configuration, errors).\nHydra's own options: --hydra-help")
    return {"app_name": "cbam-train", "header": header, "footer": footer, "template": template}


def _value(args: list, key: str) -> str | None:
    for a in args:
        if override_key(a) == key and "=" in a:
            return a.split("=", 1)[1]
    return None


def _quoted(path: Path) -> str:
    """A path as a Hydra override value (quoted: paths may hold spaces, '=' or brackets)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def with_recorded_overrides(args: list) -> list:
    """`resume=PATH`, and `checkpoint=PATH` for a task that reads one (config/tasks.py), re-create the run's
    config: its recorded overrides come first and the ones given now win; a resume also writes into the run's
    own dir (hydra.run.dir)."""
    overrides = [a for a in args if not a.startswith("-") and "=" in a]
    resume, ckpt = _value(overrides, "resume"), _value(overrides, "checkpoint")
    task = TASKS.get(_value(overrides, "task") or Config.task)
    target = resume if resume else ckpt if task is not None and task.reads_checkpoint else None
    if not target:
        return args
    if resume and any(a in ("-m", "--multirun") for a in args):
        fail("resume= continues one run; drop -m/--multirun")
    key = "resume" if resume else "checkpoint"
    path = Path(target).expanduser()
    if not path.exists():
        fail(f"{key}={target}: no such {'run dir or ' if resume else ''}checkpoint file")
    path = path.resolve()
    run_dir = run_dir_of(path)
    try:
        recorded = recorded_overrides(run_dir, path if path.is_file() else None, key)
    except UserError as e:
        fail(str(e), e.exit_code)
    given = [f"{key}={_quoted(path)}" if override_key(a) == key else a for a in overrides]
    # the run's own dir only when continuing from its latest state; an earlier checkpoint (best.pt, stage*.pt)
    # branches into a new run dir and leaves the run's later results alone
    latest = path.is_dir() or (run_dir is not None and path == (run_dir / "checkpoints" / "last.pt").resolve())
    if resume and run_dir is not None and latest and _value(overrides, "hydra.run.dir") is None:
        given.append(f"hydra.run.dir={_quoted(run_dir)}")
    flags = [a for a in args if a not in overrides]
    return flags + merge_overrides(recorded, given)


PRESET_GROUPS = ("experiment", "hparams_search")  # groups that change other groups' values


def _resolved(cfg: DictConfig) -> dict:
    """cfg as plain dicts and lists, interpolations resolved."""
    # cast: to_container's return type covers every node kind (a ListConfig's list, ...); a DictConfig gives a dict
    return cast(dict, OmegaConf.to_container(cfg, resolve=True))


def default_config(choices: dict) -> dict:
    """The config the chosen groups give with no preset and no overrides, resolved, as plain containers."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"{group}={choice}" for group, choice in choices.items() if group not in PRESET_GROUPS]
    if GlobalHydra.instance().is_initialized():  # inside @hydra.main (and a launcher's job that restored it)
        return _resolved(compose("config", overrides))
    with initialize_config_dir(str(find_conf_dir()), version_base="1.3"):
        return _resolved(compose("config", overrides))


def config_view(dcfg: DictConfig, run_dir: Path, overrides: list, resume: Optional[str]) -> ConfigView:
    """log.show_config=compact: the chosen groups, the overrides (those a resume took from the run marked) and
    every value that differs from default_config(); that comparison failing only costs its lines, with a warning."""
    chosen = {group: choice for group, choice in HydraConfig.get().runtime.choices.items()
              if not group.startswith("hydra/") and choice is not None}
    order = list(dcfg)  # the groups in the config's order (model, data, ...), presets last
    choices = dict(sorted(chosen.items(), key=lambda gc: order.index(gc[0]) if gc[0] in order else len(order)))
    full = run_dir / ".hydra" / "config.yaml"
    view = ConfigView(groups=choices, overrides=list(overrides),
                      full_path=f"{full}{', as the run was started' if full.exists() else ''}")
    try:
        if resume:
            source = run_dir_of(Path(resume).expanduser().resolve())
            recorded = recorded_overrides(source, None) if source is not None else []
            view.from_run = [o for o in view.overrides if o in recorded]
        view.changed = config_changes(_resolved(dcfg), default_config(choices))
    except Exception as e:  # noqa: BLE001 - a view of the config must never stop the run it describes
        view.warning = (f"log.show_config=compact: could not compare with the default config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); showing the overrides only")
    return view


def _job(dcfg: DictConfig, run_dir: Path, overrides: list, job: JobInfo) -> Optional[float]:
    """Validate the composed config and run its task; return the value of `optimized_metric` (None when the
    task did not measure it). Errors propagate (see outcome())."""
    try:
        # cast: to_object's return type covers every node kind; a structured config gives its dataclass, Config
        cfg: Config = validate(cast(Config, OmegaConf.to_object(dcfg)))
    except MissingMandatoryValue as e:
        raise UserError(f"config: {e.full_key} is required; set {e.full_key}=...") from None
    except OmegaConfBaseException as e:
        raise UserError(f"config: {condense_hydra_error(str(e))}") from None
    from cbam_train.training.device import set_threads  # torch: imported once the config is known to be good

    set_threads(cfg.device.threads)  # every task: a job of eval or predict on a shared node keeps to its share
    record = {"config.yaml": OmegaConf.to_yaml(dcfg), "overrides.yaml": OmegaConf.to_yaml(overrides)}
    if TASKS[cfg.task].shows_config and cfg.log.show_config == "compact":
        job.view = config_view(dcfg, run_dir, overrides, cfg.resume)
    result = TASKS[cfg.task].load()(cfg, run_dir, record, job)
    value = (result or {}).get(cfg.optimized_metric) if isinstance(result, dict) else None
    # a sweeper takes a finite float; None (not measured, e.g. no val split) or NaN records a failed trial
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def outcome(e: BaseException) -> tuple | None:
    """(label, one-line message, exit code) for an error we raise on purpose; None for a bug."""
    if isinstance(e, KeyboardInterrupt):
        return "error", "interrupted", 130
    if isinstance(e, OSError):  # the machine, not the config: a full disk, a folder that vanished, a permission
        return "error", f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}", 1
    if isinstance(e, Exception) and hasattr(e, "exit_code"):  # UserError (2), training failures (1), signals
        return getattr(e, "label", "error"), str(e), e.exit_code
    return None


def run_task(dcfg: DictConfig) -> Optional[float]:
    """Hydra's task function: one run, or one job of a sweep. Returns the `optimized_metric` value for
    sweepers (Optuna); a failed sweep job returns None, which a sweeper records as a failed trial.

    Module-level and undecorated: launchers that pickle the task function (submitit, joblib) then pickle a
    reference to cbam_train.cli.run_task, not its code and globals."""
    release_stderr()
    os.environ.update(submitit_ranks())  # a multi-task submitit job runs data-parallel, as under torchrun
    started = time.time()
    hc = HydraConfig.get()
    run_dir, overrides = Path(hc.runtime.output_dir), list(hc.overrides.task)
    sweep = hc.mode == RunMode.MULTIRUN
    try:
        job = JobInfo(hc.job.name, overrides, hc.job.num if sweep else None, hc.sweep.dir if sweep else None)
        requeued = requeued_resume(run_dir)
        if requeued is not None and OmegaConf.select(dcfg, "resume") is None:  # a timed-out or preempted job
            dcfg.resume = requeued
        value = _job(dcfg, run_dir, overrides, job)
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        out = outcome(e)
        if not sweep:
            if out is None:
                raise
            fail(out[1], out[2], out[0])
        # a sweep job: record how it ended; the sweep goes on unless told otherwise (or the user stopped it)
        label, msg, code = out or ("error", f"{type(e).__name__}: {e} (a bug: please report it)", 1)
        stopped = code in (130, 143)
        if is_main_process():
            write_status(run_dir, hc.job.num, overrides, JobEnd("interrupted" if stopped else "failed", msg, code),
                         started)
        if out is None:
            raise
        print_error(msg, label)
        if stopped or OmegaConf.select(dcfg, "sweep.fail_fast", default=False):
            sys.exit(code)
        return None
    if sweep and is_main_process():
        end = JobEnd("completed", metric=OmegaConf.select(dcfg, "optimized_metric"), value=value)
        write_status(run_dir, hc.job.num, overrides, end, started)
    return value


_hydra_main = hydra.main(version_base="1.3", config_path=str(find_conf_dir()), config_name="config")(run_task)


def main() -> None:
    """Console entry point. Hydra's own composition errors are captured and shown as one line."""
    register_configs()
    quiet_sacct(lambda line: print_error(line, "warning"))
    try:
        sys.argv = sys.argv[:1] + schedule_files(with_recorded_overrides(sys.argv[1:]))
    except UserError as e:
        fail(str(e), e.exit_code)
    captured = CapturedStderr(sys.stderr)
    sys.stderr = captured
    try:
        _hydra_main()
    except SystemExit as e:
        sys.stderr = captured.real
        text = captured.getvalue()
        line = failure_line(text, sys.argv[1:]) if e.code not in (0, None) else None
        if line:
            fail(line, 2)
        sys.stderr.write(text)
        raise
    except ValueError as e:  # Hydra's usage errors: -m with --cfg, --resolve without --cfg, --shell-completion alone
        sys.stderr = captured.real
        if raised_by_hydra(e):
            fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, 2)
        sys.stderr.write(captured.getvalue())
        raise
    except BaseException as e:
        sys.stderr = captured.real
        refused = submission_refused("".join(traceback.format_exception(e)))  # HYDRA_FULL_ERROR=1 lets it out
        if refused:  # submitit printed sbatch's stderr into `captured` already: the line quotes it
            fail(refused, 2)
        sys.stderr.write(captured.getvalue())
        raise
    sys.stderr = captured.real
    sys.stderr.write(captured.getvalue())


if __name__ == "__main__":
    main()
