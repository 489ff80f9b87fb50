"""Sweeps (`cbam-train -m ...`): each job records its outcome in status.json; at the end of the multirun
a Hydra Callback gathers them into sweep_summary.csv / .json and sweep.png at the sweep root and prints a
table sorted by best val accuracy. It reads only files, so it works for any launcher (local, submitit)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console, JustifyMethod
from rich.table import Table

from cbam_train.reporting.charts import draw_sweep, safe_draw, short_number
from cbam_train.reporting.console import fail, release_stderr
from cbam_train.reporting.reporter import csv_text
from cbam_train.state.atomic import write_json_atomic, write_text_atomic

COLUMNS = ("job", "overrides", "status", "best_val_acc", "final_val_acc", "test_acc", "epochs", "wall_time_s",
           "run_dir", "error", "metric", "value")


@dataclass(frozen=True)
class JobEnd:
    """How a sweep job ended: completed | failed | interrupted, with its error line and exit code, and the value
    it returned to the sweeper (`metric`: the optimized_metric that value is)."""

    status: str
    error: Optional[str] = None
    exit_code: int = 0
    metric: Optional[str] = None
    value: Optional[float] = None


def write_status(job_dir: Path, job: int, overrides: list, end: JobEnd, started: Optional[float] = None) -> None:
    """<job dir>/status.json: how this sweep job ended (JobEnd), and where and when it ran (host, pid,
    started/ended in seconds since the epoch: which node of a cluster, which jobs overlapped)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(job_dir / "status.json", {"job": job, "overrides": list(overrides), "status": end.status,
                                                "error": end.error, "exit_code": end.exit_code, "metric": end.metric,
                                                "value": end.value, "host": socket.gethostname(), "pid": os.getpid(),
                                                "started": started, "ended": time.time()})


def collect(sweep_dir: Path) -> list:
    """One row per job dir under sweep_dir that has a status.json, in job order."""
    rows = []
    for status_file in sweep_dir.glob("*/status.json"):
        status = json.loads(status_file.read_text())
        summary_file = status_file.parent / "summary.json"
        s = json.loads(summary_file.read_text()) if summary_file.is_file() and status["status"] == "completed" else {}
        rows.append({"job": status["job"], "overrides": status["overrides"], "status": status["status"],
                     "best_val_acc": s.get("best_val_acc"), "final_val_acc": s.get("final_val_acc"),
                     "test_acc": s.get("test_acc"), "epochs": s.get("epochs_run"),
                     "wall_time_s": s.get("wall_time_s"), "run_dir": str(status_file.parent), "error": status["error"],
                     "metric": status.get("metric"), "value": status.get("value")})
    return sorted(rows, key=lambda r: r["job"])


def swept(rows: list) -> list:
    """Each job's overrides that differ between jobs (the swept values), for labels; shared ones left out."""
    from cbam_train.cli.overrides import override_key

    values: dict = {}
    for r in rows:
        for o in r["overrides"]:
            values.setdefault(override_key(o), set()).add(o)
    keep = {k for k, v in values.items() if len(v) > 1 or any(k not in map(override_key, r["overrides"])
                                                            for r in rows)}
    return [[o for o in r["overrides"] if override_key(o) in keep] for r in rows]


def _short(override: str) -> str:
    """key=value with a long float at 3 significant digits (Optuna's values carry 17)."""
    key, _, value = override.partition("=")
    return f"{key}={short_number(value)}"


def ranked(rows: list) -> list:
    """Completed jobs by best val accuracy (highest first), then the others."""
    return sorted(rows, key=lambda r: (r["best_val_acc"] is None, -(r["best_val_acc"] or 0.0), r["job"]))


def write_summary(sweep_dir: Path, rows: list) -> None:
    """sweep_summary.json (overrides as lists) and sweep_summary.csv (overrides joined by spaces)."""
    write_json_atomic(sweep_dir / "sweep_summary.json", rows)
    flat = [{**r, "overrides": " ".join(r["overrides"])} for r in rows]
    write_text_atomic(sweep_dir / "sweep_summary.csv", csv_text(flat, columns=COLUMNS))


def summary_table(rows: list, sweep_dir: Path) -> Table:
    t = Table(title=f"sweep: {sweep_dir}", caption="overrides: the swept ones; full lists in sweep_summary.csv")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("#", "right"), ("overrides", "left"), ("status", "left"), ("best val", "right"), ("final val", "right"),
        ("test", "right"), ("epochs", "right"), ("time", "right"))
    for col, just in columns:
        t.add_column(col, justify=just)
    pct = lambda v: "" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    labels = {r["job"]: " ".join(_short(o) for o in overrides) for r, overrides in zip(rows, swept(rows), strict=True)}
    for r in ranked(rows):
        t.add_row(str(r["job"]), labels[r["job"]],
                  r["status"] if r["status"] == "completed" else f"{r['status']}: {r['error']}",
                  pct(r["best_val_acc"]), pct(r["final_val_acc"]), pct(r["test_acc"]),
                  "" if r["epochs"] is None else str(r["epochs"]),
                  "" if r["wall_time_s"] is None else f"{r['wall_time_s']:.1f} s")
    return t


class SbatchEchoDropped:
    """sys.stderr during a submitit sweep, less submitit's echo of a refused sbatch's stderr (it prints it before
    raising FailedJobError): cli/command.main says the error as one line that quotes it."""

    def __init__(self, real: Any) -> None:
        self.real, self._newline_too = real, False

    def write(self, text: str) -> int:
        if text.startswith("sbatch: error:"):  # print(stderr, file=sys.stderr): the text, then "\n" on its own
            self._newline_too = True
            return len(text)
        if self._newline_too and text == "\n":
            self._newline_too = False
            return 1
        self._newline_too = False
        return self.real.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class SweepSummary(Callback):
    """Registered in conf/config.yaml (hydra.callbacks.sweep_summary); Hydra calls it after the last job."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        release_stderr()  # the sweep is composed: the parent's stderr is its own again, for the sweep's whole run
        # submitit's launchers: an error while submitting (sbatch refusing the jobs) reaches cli/command.main as
        # the exception, which it turns into one line, not as the traceback Hydra prints (Hydra reads this
        # variable when it fails); unset again when the sweep ends. The jobs' own errors never reach Hydra.
        if "submitit" in str(OmegaConf.select(config, "hydra.launcher._target_", default="")):
            self.full_error = os.environ.get("HYDRA_FULL_ERROR")
            os.environ["HYDRA_FULL_ERROR"] = "1"
            sys.stderr = SbatchEchoDropped(sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if isinstance(sys.stderr, SbatchEchoDropped):
            sys.stderr = sys.stderr.real
        if hasattr(self, "full_error"):
            os.environ.pop("HYDRA_FULL_ERROR", None)
            if self.full_error is not None:
                os.environ["HYDRA_FULL_ERROR"] = self.full_error
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        if not rows:
            return
        write_summary(sweep_dir, rows)
        console = Console(highlight=False, markup=False)
        if not console.is_terminal:
            console = Console(highlight=False, markup=False, width=160, no_color=True)
        labelled = [{**r, "overrides": o} for r, o in zip(rows, swept(rows), strict=True)]
        safe_draw(lambda: draw_sweep(labelled, sweep_dir / "sweep.png"), sweep_dir / "sweep.png",
                  lambda msg: console.print(f"warning: {msg}"))
        console.print(summary_table(rows, sweep_dir))
        failed = [r for r in rows if r["status"] != "completed"]
        console.print(f"wrote {sweep_dir / 'sweep_summary.csv'}, sweep_summary.json and sweep.png")
        if failed:
            fail(f"{len(failed)} of {len(rows)} sweep jobs did not complete (job {failed[0]['job']}: "
                 f"{failed[0]['error']}); see {sweep_dir / 'sweep_summary.csv'}", 1)
