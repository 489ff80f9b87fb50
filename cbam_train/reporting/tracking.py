"""logger=mlflow: one MLflow run per training run (per job of a sweep), in a local SQLite store by default.

Params are the flattened resolved config, metrics every numeric metrics.jsonl column at step = epoch, tags
the command line's overrides; curves.png, summary.json, metrics.csv, the attention pictures (and model.pt
with logger.log_model) are logged as artifacts when the run ends. The MLflow run id is kept in
<run dir>/mlflow_run.json, so a resume in the same run dir continues the same MLflow run."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

from cbam_train.config.errors import UserError
from cbam_train.config.schema import LoggerConfig
from cbam_train.config.tasks import JobInfo
from cbam_train.state.atomic import write_json_atomic

DEFAULT_DIR = "mlruns"  # beside outputs/ (in the working directory)
DB_NAME = "mlflow.db"
RUN_FILE = "mlflow_run.json"
PARAM_BATCH = 100  # MLflow's limit of params per log_batch call
ARTIFACT_GLOBS = ("curves.png", "summary.json", "metrics.csv", "attention*.png", "attention.jsonl", "schedule.yaml",
                  "lr_find/*.png")


def import_client() -> type:
    """mlflow's MlflowClient; without the package, one line (called at start-up, before anything is written)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError("logger=mlflow: the mlflow package is not installed; pip install 'cbam-train[mlflow]' "
                        "(mlflow-skinny with SQLite support), or drop logger=mlflow (metrics.csv and curves.png are "
                        "always written)") from None
    return MlflowClient


def store_uri(setting: Optional[str], cwd: Path) -> tuple:
    """(tracking URI, local folder or None): logger.tracking_uri as given when it has a scheme (sqlite:///,
    http://, ...); a plain path, or null for ./mlruns, is a folder holding mlflow.db and the artifacts."""
    if setting and ("://" in setting or setting.startswith("file:")):
        return setting, None
    folder = (cwd / (setting or DEFAULT_DIR)).expanduser().resolve()
    return f"sqlite:///{folder / DB_NAME}", folder


def _one_line(e: BaseException) -> str:
    """An MLflow / SQLAlchemy / OS error's first line, without the links and SQL that follow."""
    text = str(getattr(e, "message", None) or e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line.split(" See https://")[0].split(" (Background on this error")[0].rstrip(".")


def numeric_columns(row: dict) -> dict:
    """The metrics of one metrics.jsonl row: its numbers (booleans as 0/1); strings and nulls are not metrics."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}


class MlflowTracker:
    """The MLflow side of one run: connect() at start-up, start() once the run dir is claimed, then rows and
    the artifacts at the end. After a logging failure it warns once and logs nothing more (training goes on)."""

    def __init__(self, settings: LoggerConfig, job: JobInfo, cwd: Path) -> None:
        self.settings, self.job = settings, job
        self.uri, self.folder = store_uri(settings.tracking_uri, cwd)
        self.experiment = settings.experiment or job.name
        self.client: Any = None
        self.run_id: Optional[str] = None
        self.logged_epochs: set = set()  # epochs the MLflow run already has (a continued run's)
        self.warn: Callable[[str], None] = lambda msg: None
        self._experiment_id: Optional[str] = None

    def connect(self) -> None:
        """Open the store and find or create the experiment; any problem is one line naming logger.tracking_uri."""
        client_class = import_client()
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines ("Creating initial tables...")
        logging.getLogger("alembic").setLevel(logging.WARNING)
        given = self.settings.tracking_uri or DEFAULT_DIR
        where = f"logger.tracking_uri={given}" + (f" ({self.uri})" if self.uri != given else "")
        try:
            if self.folder is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
            self.client = client_class(tracking_uri=self.uri)
            self._experiment_id = self._find_or_create_experiment()
        except UserError:
            raise
        except Exception as e:  # MlflowException, SQLAlchemy's OperationalError, OSError, a refused connection
            if "MLFLOW_ALLOW_FILE_STORE" in str(e):
                raise UserError(f"{where}: MLflow refuses its file store (maintenance mode) unless "
                                "MLFLOW_ALLOW_FILE_STORE=true is set; set it, or give a folder without file: (a "
                                "SQLite store, as the default ./mlruns)") from None
            raise UserError(f"{where}: {_one_line(e)}") from None

    def _find_or_create_experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            location = (self.folder / "artifacts").as_uri() if self.folder is not None else None
            try:
                return self.client.create_experiment(self.experiment, artifact_location=location)
            except Exception:  # another job of a parallel sweep created it first
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            raise UserError(f"logger.experiment={self.experiment}: the MLflow experiment is deleted; restore it "
                            "(mlflow experiments restore) or choose another name with logger.experiment=NAME")
        return found.experiment_id

    def start(self, run_dir: Path, params: dict, resumed_from: Optional[str], warn: Callable[[str], None]) -> None:
        """Continue the MLflow run recorded in run_dir (a resume in the same dir), else create one; log params.
        A failure is one line (UserError)."""
        self.warn = warn
        try:
            self._start(run_dir, params, resumed_from)
        except Exception as e:
            raise UserError(f"logger=mlflow: could not start the MLflow run in {self.uri}: {_one_line(e)}") from None

    def _start(self, run_dir: Path, params: dict, resumed_from: Optional[str]) -> None:
        record = run_dir / RUN_FILE
        previous = json.loads(record.read_text()) if record.is_file() else None
        if previous and previous.get("tracking_uri") == self.uri and self._still_there(previous["run_id"]):
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            self._continue(params)
            return
        tags = {"run_dir": str(run_dir), "overrides": " ".join(self.job.overrides)[:5000]}
        tags.update({f"override.{k}": v for k, v in _override_tags(self.job.overrides).items()})
        if self.job.num is not None:
            tags.update({"sweep.job": str(self.job.num), "sweep.dir": str(self.job.sweep_dir)})
        if resumed_from:
            tags["resumed_from"] = resumed_from
        run = self.client.create_run(self._experiment_id, run_name=_run_name(run_dir), tags=tags)
        self.run_id = run.info.run_id
        write_json_atomic(record, {"tracking_uri": self.uri, "experiment": self.experiment,
                                   "experiment_id": self._experiment_id, "run_id": self.run_id})
        self._log_params(params)

    def _still_there(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:
            return False

    def _continue(self, params: dict) -> None:
        """A continued run keeps its params (MLflow refuses to change one): new keys are logged, changed values
        (a resume may change an lr or add epochs) become tags resumed.<key>."""
        run = self.client.get_run(self.run_id)
        old = run.data.params
        self._log_params({k: v for k, v in params.items() if k not in old})
        for key, value in params.items():
            if key in old and old[key] != _text(value):
                self.client.set_tag(self.run_id, f"resumed.{key}", _text(value))
        history = self.client.get_metric_history(self.run_id, "epoch")
        self.logged_epochs = {int(m.step) for m in history}

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, _text(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + PARAM_BATCH])

    def log_params(self, params: dict) -> None:
        """Params decided during the run (a stage's found lr): logged as new keys, never changing one."""
        if self.run_id is None:
            return
        try:
            self._log_params(params)
        except Exception as e:
            self._give_up(e)

    def log_rows(self, rows: list, only_new: bool = False) -> None:
        """Each row's numbers as metrics at step = its epoch. only_new: skip epochs the run already has (the
        rows a resume restores); a re-run epoch is logged again, and MLflow's latest value at a step wins."""
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, int(row["epoch"])) for row in rows
                   if not (only_new and int(row["epoch"]) in self.logged_epochs)
                   for key, value in numeric_columns(row).items()]
        try:
            for i in range(0, len(metrics), 1000):  # MLflow's limit of metrics per log_batch call
                self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        except Exception as e:
            self._give_up(e)

    def finish(self, run_dir: Path, status: str) -> None:
        """Log the run's artifacts (those that exist) and end the MLflow run with status FINISHED|KILLED|FAILED."""
        if self.run_id is None:
            return
        try:
            files = sorted({p for pattern in ARTIFACT_GLOBS for p in run_dir.glob(pattern) if p.is_file()})
            if self.settings.log_model and (run_dir / "model.pt").is_file():
                files.append(run_dir / "model.pt")
            for path in files:
                self.client.log_artifact(self.run_id, str(path))
            if (run_dir / "attention").is_dir():
                self.client.log_artifacts(self.run_id, str(run_dir / "attention"), artifact_path="attention")
            self.client.set_terminated(self.run_id, status)
        except Exception as e:
            self._give_up(e)

    def _give_up(self, e: Exception) -> None:
        self.warn(f"logger=mlflow: logging to {self.uri} failed ({_one_line(e)}); the run goes on, MLflow gets "
                  f"nothing more from it (metrics.jsonl has every epoch)")
        self.run_id = None


def _text(value: Any) -> str:
    """A param's value as MLflow stores it (mlflow.log_param's str()), cut to its 6000-character limit."""
    return str(value)[:6000]


def _override_tags(overrides: list) -> dict:
    """{'lr': '1e-3', ...} from ['lr=1e-3', ...]; prefixes (+, ~, ++) dropped, keys MLflow would refuse skipped."""
    tags = {}
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if key and all(c.isalnum() or c in "_-./ :" for c in key):
            tags[key] = value[:5000]
    return tags


def _run_name(run_dir: Path) -> str:
    """The run dir's last parts: '2026-12-02/04-30-00', or '04-30-00/1' for job 1 of a sweep."""
    return "/".join(run_dir.resolve().parts[-2:])
