"""logger=mlflow (tracking.py): what MlflowClient reads back from a real CLI sweep equals the run's own files
(params: the flattened config in summary.json; metrics: every numeric metrics.jsonl column per epoch), a resume
continues the same MLflow run without doubling epochs, and bad input is one line with the run dir left empty."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import SMOKE_RUN, call_cli, cli_lines, compose_config, run_cli

from cbam_train.config.errors import ConfigError
from cbam_train.config.schema import LoggerConfig
from cbam_train.config.tasks import JobInfo
from cbam_train.config.validation import validate
from cbam_train.config.view import flatten
from cbam_train.reporting.tracking import DB_NAME, MlflowTracker, numeric_columns, store_uri

# The sweep's jobs draw no attention pictures: at 6 stage ends they cost 71 -> 113 s of CPU here (2026-12-02);
# test_attention_pictures_are_logged_when_present checks that attention/ and attention*.png are logged.
ATTENTION = "log.attention_report=false"

def needs_mlflow():
    return pytest.importorskip("mlflow", reason="mlflow is not installed (the [mlflow] extra, in dev)")


# ---------------------------------------------------------------- config, no MLflow needed

def test_logger_is_a_list_of_flags():
    both = compose_config(["logger=[tensorboard,mlflow]"]).logger
    assert (both.tensorboard, both.mlflow) == (True, True)
    one = compose_config(["logger=mlflow"]).logger
    assert (one.tensorboard, one.mlflow, one.tracking_uri, one.log_model) == (False, True, None, False)
    none = compose_config([]).logger
    assert (none.tensorboard, none.mlflow) == (False, False)


def test_store_uri_default_folder_path_and_scheme(tmp_path):
    assert store_uri(None, tmp_path) == (f"sqlite:///{tmp_path.resolve() / 'mlruns' / DB_NAME}",
                                         tmp_path.resolve() / "mlruns")
    assert store_uri("elsewhere/runs", tmp_path)[1] == tmp_path.resolve() / "elsewhere" / "runs"
    assert store_uri("sqlite:////data/m.db", tmp_path) == ("sqlite:////data/m.db", None)
    assert store_uri("http://host:5000", tmp_path) == ("http://host:5000", None)


def test_numeric_columns_skip_strings_and_nulls():
    row = {"epoch": 3, "stage_name": "full", "val_loss": None, "lr": 1e-4, "stage_end": "epochs", "ok": True}
    assert numeric_columns(row) == {"epoch": 3.0, "lr": 1e-4, "ok": 1.0}


def test_empty_experiment_name_is_refused():
    with pytest.raises(ConfigError, match="logger.experiment: '' is empty"):
        validate(compose_config(["logger=mlflow", "logger.experiment=''"]))


# ---------------------------------------------------------------- bad input, in-process through cli.main

def cli_main(argv: list, tmp_path: Path) -> tuple:
    """conftest.cli_lines of `cbam-train experiment=smoke logger=mlflow ARGV`: (exit code, stderr lines, run dir)."""
    return cli_lines(["experiment=smoke", "log.mode=plain", "logger=mlflow", *argv], tmp_path)


def assert_nothing_written(run_dir: Path, tmp_path: Path) -> None:
    assert not run_dir.exists() or not any(run_dir.iterdir())  # Hydra may have made it, empty
    assert not (tmp_path / "mlruns").exists()


def test_without_mlflow_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    for name in ("mlflow", "mlflow.tracking"):  # `import mlflow` now raises ImportError, as when not installed
        monkeypatch.setitem(sys.modules, name, None)
    code, err, run_dir = cli_main([], tmp_path)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: logger=mlflow: the mlflow package is not installed; "
                             "pip install 'cbam-train[mlflow]'")
    assert_nothing_written(run_dir, tmp_path)


@pytest.mark.parametrize("uri, says", [("foo://nowhere", "unsupported URI 'foo://nowhere'"),
                                       ("{file}/mlruns", "Not a directory"),
                                       ("file:./old", "unless MLFLOW_ALLOW_FILE_STORE=true is set")])
def test_bad_tracking_uri_is_one_line(uri, says, tmp_path, monkeypatch, capsys):
    needs_mlflow()
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    (tmp_path / "afile").write_text("not a folder")
    uri = uri.format(file=tmp_path / "afile")
    code, err, run_dir = cli_main([f"logger.tracking_uri={uri}"], tmp_path)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: logger.tracking_uri={uri}") and says in err[0]
    assert_nothing_written(run_dir, tmp_path)
    assert not (tmp_path / "old").exists()


# ---------------------------------------------------------------- the real CLI: a sweep of 2 jobs, then a resume

@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`cbam-train -m ... logger=[tensorboard,mlflow] logger.log_model=false,true` in a fresh folder: that folder.
    A real process: MLflow's and Alembic's loggers write to the stderr they found at import, which only a fresh
    interpreter shows as a user would see it."""
    needs_mlflow()
    pytest.importorskip("torch.utils.tensorboard", reason="tensorboard is not installed (it is in the dev extra)")
    tmp = tmp_path_factory.mktemp("mlflow")
    proc = run_cli(["-m", *SMOKE_RUN, "logger=[tensorboard,mlflow]", "logger.log_model=false,true", ATTENTION,
                    "train.checkpoint_every_n_epochs=1", f"hydra.sweep.dir={tmp / 'sweep'}"], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INFO mlflow" not in proc.stderr and "alembic" not in proc.stderr  # MLflow's own chatter is silenced
    return tmp


def client_for(folder: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns' / DB_NAME}")


def latest_per_step(client, run_id: str, key: str) -> dict:
    """{step: value} of a metric, the latest value at each step winning (MLflow keeps every value logged)."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}


def assert_run_matches_files(client, run_dir: Path, changed: tuple = ()) -> None:
    """The MLflow run of run_dir holds its config as params and each metrics.jsonl row's numbers at its epoch;
    `changed`: keys a resume changed (params keep the first value, a tag resumed.<key> holds the new one)."""
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.info.status == "FINISHED"
    config = {k: str(v) for k, v in flatten(summary["config"]).items()}
    assert set(run.data.params) == set(config)
    assert {k: v for k, v in run.data.params.items() if k not in changed} == {
        k: v for k, v in config.items() if k not in changed}
    assert {k: run.data.tags[f"resumed.{k}"] for k in changed} == {k: config[k] for k in changed}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    columns = {k for row in rows for k in row}
    assert {"epoch", "train_loss", "val_acc", "lr", "epoch_time_s"} <= columns
    for key in columns:
        expected = {row["epoch"]: float(row[key]) for row in rows if isinstance(row.get(key), (int, float))}
        assert latest_per_step(client, run_id, key) == expected, key  # strings (stage_name) are no metrics
    assert sorted(run.data.metrics) == sorted(k for k in columns if any(isinstance(r.get(k), (int, float))
                                                                        for r in rows))


@pytest.mark.slow
def test_sweep_jobs_are_runs_of_one_experiment_matching_their_files(sweep):
    client = client_for(sweep)
    experiment = client.get_experiment_by_name("cbam-train")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    by_job = {r.data.tags["sweep.job"]: r for r in runs}
    for job, log_model in (("0", "False"), ("1", "True")):  # the tag: the job's override as Hydra spells it
        run, run_dir = by_job[job], sweep / "sweep" / job
        assert run.data.tags["override.logger.log_model"] == log_model
        assert run.data.tags["override.logger"] == "[tensorboard,mlflow]"
        assert any((run_dir / "tensorboard").iterdir())  # the list selected both loggers
        assert run.data.tags["sweep.dir"] == str(sweep / "sweep")
        assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
        assert_run_matches_files(client, run_dir)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"curves.png", "summary.json", "metrics.csv"} <= artifacts
        assert ("model.pt" in artifacts) == (log_model == "True")
    model = Path(client.download_artifacts(by_job["1"].info.run_id, "model.pt", str(sweep / "dl")))
    assert model.read_bytes() == (sweep / "sweep" / "1" / "model.pt").read_bytes()


@pytest.mark.slow
def test_resume_continues_the_run_and_a_rerun_epoch_replaces_its_values(sweep):
    """Job 1 as if killed after epoch 3 was logged but before its checkpoint: last.pt from epoch 2."""
    run_dir = sweep / "sweep" / "1"
    client = client_for(sweep)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    shutil.copy(run_dir / "checkpoints" / "stage2-high.pt", run_dir / "checkpoints" / "last.pt")
    for name in ("summary.json", "model.pt"):
        (run_dir / name).unlink()
    before = latest_per_step(client, run_id, "epoch_time_s")
    proc = call_cli([f"resume={run_dir}", "log.mode=plain"], cwd=sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id  # the same MLflow run
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 2
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == [1, 2, 3, 3]  # epochs 1-2 not logged again; epoch 3 re-run, its value latest
    assert_run_matches_files(client, run_dir, changed=("resume",))
    after = latest_per_step(client, run_id, "epoch_time_s")
    assert after[1] == before[1] and after[3] == json.loads(
        (run_dir / "metrics.jsonl").read_text().splitlines()[2])["epoch_time_s"]
    assert "model.pt" in {a.path for a in client.list_artifacts(run_id)}


@pytest.mark.slow
def test_attention_pictures_are_logged_when_present(sweep, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "attention").mkdir(parents=True)
    for path in (run_dir / "attention" / "layer1.png", run_dir / "attention.png", run_dir / "attention.jsonl",
                 run_dir / "curves.png", run_dir / "model.pt"):  # model.pt: not without logger.log_model
        path.write_bytes(b"png")
    tracker = MlflowTracker(LoggerConfig(mlflow=True, tracking_uri=str(sweep / "mlruns"), experiment="pictures"),
                            JobInfo(), tmp_path)
    tracker.connect()
    tracker.start(run_dir, {"a": 1}, None, print)
    tracker.finish(run_dir, "FINISHED")
    client = client_for(sweep)
    assert {a.path for a in client.list_artifacts(tracker.run_id)} == {"attention", "attention.png", "attention.jsonl",
                                                                        "curves.png"}
    assert [a.path for a in client.list_artifacts(tracker.run_id, "attention")] == ["attention/layer1.png"]
