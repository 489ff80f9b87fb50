"""The run dir: refuse one that holds another run's results, check it can be written, record the config.
A run writes nothing into its dir before these checks pass."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from cbam_train.config.errors import UserError

if TYPE_CHECKING:  # resume.py reads checkpoints (torch); this module stays importable without it
    from cbam_train.state.resume import Resume

RUN_FILES = ("metrics.jsonl", "summary.json", "model.pt", "train.log", "checkpoints")


def check_run_dir(run_dir: Path, files: tuple = RUN_FILES, resuming: bool = False) -> None:
    """Refuse to write into a folder that already holds a run's results (never overwrite them), unless
    this is that run resuming; either way the folder must be writable."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"run dir {run_dir} cannot be created ({e.strerror}); "
                        "choose another with hydra.run.dir=PATH") from None
    taken = [f for f in files + (".hydra",) if (run_dir / f).exists()]
    if taken and not resuming:
        raise UserError(f"run dir {run_dir} already holds a run ({', '.join(taken)}); "
                        "choose another with hydra.run.dir=PATH")
    probe = run_dir / ".write_test"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run dir {run_dir} is not writable ({e.strerror}); "
                        "choose another with hydra.run.dir=PATH") from None


def claim_run_dir(run_dir: Path, record: Optional[dict], required: tuple, resume: Optional[Resume],
                  finished: bool) -> None:
    """Check the run dir is free (or the resumed run's own, with something to resume), then record the config.
    `finished`: the resumed checkpoint has every stage of this config done."""
    same_dir = resume is not None and resume.run_dir is not None and resume.run_dir.resolve() == run_dir.resolve()
    own = resume if same_dir else None  # the resumed run, continuing in its own run dir
    if own is not None and own.path is not None and \
            own.path.resolve() != (run_dir / "checkpoints" / "last.pt").resolve():
        raise UserError(f"resume={own.path}: an earlier checkpoint cannot continue in its own run dir (that would "
                        "overwrite the run's later results); drop hydra.run.dir= to branch into a new run dir")
    check_run_dir(run_dir, required, resuming=same_dir)
    if own is not None and own.state is not None and (run_dir / "summary.json").is_file() and finished:
        raise UserError(f"resume: the run in {run_dir} already finished (summary.json); nothing to resume. "
                        "To train longer, add epochs: schedule.stages.<name>.epochs=N")
    if own is not None and own.state is None:  # starting over is only right for a run that died before any result
        done = [f for f in ("summary.json", "model.pt") if (run_dir / f).exists()]
        rows = (run_dir / "metrics.jsonl").read_text().count("\n") if (run_dir / "metrics.jsonl").exists() else 0
        if done or rows:
            raise UserError(f"resume: {run_dir} has no checkpoints/last.pt but holds results "
                            f"({', '.join(done) or f'{rows} metrics row(s)'}); starting over would overwrite them. "
                            "Start a new run (init_from=RUN/model.pt takes its weights)")
    if not same_dir:
        write_record(run_dir, record)


def write_record(run_dir: Path, record: Optional[dict]) -> None:
    """.hydra/config.yaml and overrides.yaml: how this run was configured."""
    for name, text in (record or {}).items():
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / name).write_text(text)


def run_dir_of(path: Path) -> Optional[Path]:
    """The run dir a path belongs to: the dir itself, or the run holding checkpoints/X.pt or model.pt."""
    for cand in (path, path.parent.parent if path.parent.name == "checkpoints" else None, path.parent):
        if cand is not None and cand.is_dir() and (cand / ".hydra" / "overrides.yaml").is_file():
            return cand
    return None
