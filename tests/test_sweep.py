"""Sweeps: per-job status files, the summary at the sweep root (csv, json, png, table), failed jobs."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import NARROW, PICTURES_OFF, call_cli, compose_config

from cbam_train.cli.sweep import JobEnd, collect, ranked, swept, write_status, write_summary

TINY = ["experiment=smoke", NARROW, "data.image_size=8", "data.train_size=96", "data.val_size=32", "data.test_size=32",
        "data.batch_size=16", "log.mode=quiet", *PICTURES_OFF]


def fake_job(sweep, job, overrides, status, best=None, error=None):
    d = sweep / str(job)
    write_status(d, job, overrides, JobEnd(status, error, 0 if status == "completed" else 2))
    if status == "completed":
        (d / "summary.json").write_text(json.dumps({"best_val_acc": best, "final_val_acc": best, "test_acc": 0.5,
                                                    "epochs_run": 3, "wall_time_s": 1.0}))


def test_summary_rows_ranking_and_swept_labels(tmp_path):
    fake_job(tmp_path, 0, ["seed=1", "lr=1e-3"], "completed", 0.6)
    fake_job(tmp_path, 1, ["seed=1", "lr=1e-2"], "failed", error="lr too high")
    fake_job(tmp_path, 2, ["seed=1", "lr=3e-3"], "completed", 0.8)
    (tmp_path / "multirun.yaml").write_text("")  # not a job dir
    rows = collect(tmp_path)
    assert [r["job"] for r in rows] == [0, 1, 2]
    assert [r["job"] for r in ranked(rows)] == [2, 0, 1]  # best val first, failed last
    assert swept(rows) == [["lr=1e-3"], ["lr=1e-2"], ["lr=3e-3"]]  # seed=1 is common to all jobs
    write_summary(tmp_path, rows)
    assert json.loads((tmp_path / "sweep_summary.json").read_text()) == rows
    with open(tmp_path / "sweep_summary.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert [g["status"] for g in got] == ["completed", "failed", "completed"]
    assert got[1]["error"] == "lr too high" and got[2]["overrides"] == "seed=1 lr=3e-3"
    assert float(got[2]["best_val_acc"]) == 0.8


@pytest.mark.slow
def test_multirun_records_a_failed_job_and_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    proc = call_cli(["-m", *TINY, "stage=head", "lr=3e-3,-1,1e-3", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr  # the sweep finished but a job failed
    assert "Traceback" not in proc.stdout + proc.stderr
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert [(r["job"], r["status"]) for r in rows] == [(0, "completed"), (1, "failed"), (2, "completed")]
    assert rows[1]["error"] == "lr must be > 0, got -1.0"
    for r in (rows[0], rows[2]):
        summary = json.loads((sweep / str(r["job"]) / "summary.json").read_text())
        assert r["best_val_acc"] == summary["best_val_acc"] and r["epochs"] == 1
        assert (sweep / str(r["job"]) / "curves.png").is_file()
    assert (sweep / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (sweep / "sweep_summary.csv").is_file()
    table = proc.stdout[proc.stdout.index("sweep: "):]
    order = [table.index(f"lr={v}") for v in ("0.003", "0.001")]
    best = sorted((r for r in rows if r["status"] == "completed"), key=lambda r: -r["best_val_acc"])
    assert (order[0] < order[1]) == (best[0]["job"] == 0)  # sorted by best val acc
    assert "1 of 3 sweep jobs did not complete" in proc.stderr


@pytest.mark.slow
def test_fail_fast_stops_the_sweep_at_the_failed_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = call_cli(["-m", *TINY, "stage=head", "lr=-1,3e-3", "sweep.fail_fast=true", f"hydra.sweep.dir={sweep}"],
                   cwd=tmp_path)
    assert proc.returncode == 2
    assert json.loads((sweep / "0" / "status.json").read_text())["status"] == "failed"
    assert not (sweep / "1").exists()


def test_hparams_search_preset_sets_the_sweeper_grid():
    from hydra import compose, initialize_config_dir

    from cbam_train.cli.command import find_conf_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
        dcfg = compose(config_name="config", overrides=["hparams_search=lr_reduction"], return_hydra_config=True)
    assert dict(dcfg.hydra.sweeper.params) == {"lr": "3e-3,1e-3,3e-4", "model.cbam.reduction": "8,16"}
    compose_config(["hparams_search=lr_reduction"])  # and the job config still validates


def test_slurm_launcher_config():
    """conf/hydra/launcher/slurm.yaml extends the submitit plugin's config; it composes when the plugin is
    installed (it is not a dependency: the check is skipped, with this reason, without it)."""
    from omegaconf import OmegaConf

    from cbam_train.cli.command import find_conf_dir, register_configs

    raw = OmegaConf.load(find_conf_dir() / "hydra" / "launcher" / "slurm.yaml")
    assert list(raw.defaults) == ["submitit_slurm"] and raw.gpus_per_node == 1 and raw.tasks_per_node == 1
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher not installed (optional; only SLURM users need it)")
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
        dcfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert dcfg.hydra.launcher._target_.endswith("SlurmLauncher") and dcfg.hydra.launcher.gpus_per_node == 1
