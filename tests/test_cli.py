"""The CLI: the smoke run's outputs and console in a real subprocess, stage/lr/init_from, offline downloads and
bad input through cli.main in this process, and the entry point's one-line contract in a real one."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import call_cli, compose_config

from cbam_train.models import build_model

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": ""}
METRIC_KEYS = {"epoch", "stage", "stage_name", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
               "epoch_time_s", "train_images_per_s"}


def one_error_line(proc) -> str:
    """Assert the process failed with exactly one 'error:' line on stderr and no traceback; return it."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run shared by the tests below (it takes ~20 s on 2 cores)."""
    from conftest import run_cli

    tmp = tmp_path_factory.mktemp("smoke")
    proc = run_cli(["experiment=smoke", f"hydra.run.dir={tmp / 'run'}"], cwd=tmp)
    return proc, tmp / "run"


@pytest.mark.slow
def test_smoke_run_writes_the_output_contract(smoke_run):
    proc, run = smoke_run
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [(r["stage"], r["stage_name"]) for r in rows] == [(1, "head"), (2, "high"), (3, "full")]
    assert [r["lr"] for r in rows] == pytest.approx([3e-3, 1e-3, 3e-4])
    for r in rows:
        assert METRIC_KEYS <= set(r)
        assert 0.0 <= r["train_acc"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0
        assert r["epoch_time_s"] > 0 and r["train_images_per_s"] > 0
    s = json.loads((run / "summary.json").read_text())
    assert s["epochs_run"] == 3 and s["device"] == "cpu"
    assert s["best_val_acc"] == max(r["val_acc"] for r in rows)
    assert s["final_val_acc"] == rows[-1]["val_acc"]
    assert s["best_val_acc"] > 0.3  # 10 classes: chance is 0.1
    assert s["test_acc"] is not None and s["test_acc"] > 0.3
    assert [st["name"] for st in s["stages"]] == ["head", "high", "full"]
    assert s["stages"][1]["trainable"] == ["fc", "cbam", "layer3", "layer4"]
    assert s["stages"][0]["trainable_params"] == s["stages"][2]["trainable_params"]  # smoke's head trains all
    assert s["stages"][1]["trainable_params"] < s["stages"][2]["trainable_params"]
    assert s["config"]["data"]["name"] == "synthetic"
    # model.pt is a plain state dict that loads strictly into the model built from the same config
    state = torch.load(run / "model.pt", weights_only=True)
    build_model(compose_config(["experiment=smoke"]).model).load_state_dict(state)


@pytest.mark.slow
def test_smoke_run_console_and_log_are_plain_when_captured(smoke_run):
    proc, run = smoke_run
    log = (run / "train.log").read_text()
    for text in (proc.stdout, proc.stderr, log):
        assert not ANSI.search(text)
    assert "stage 2/3 'high'" in proc.stdout and "stage 2/3 'high'" in log
    assert re.search(r"epoch +3 \[full\] train loss", log)
    assert "lr" in proc.stdout and "3.00e-03" in proc.stdout  # the resolved per-stage lrs are printed
    # log.show_config=compact: the preset's values with their defaults and the full config's path, not the tree
    for text in (proc.stdout, log):
        assert "schedule.stages.head.lr: 0.003 (default 0.001)" in text and "overrides    experiment=smoke" in text
        assert f"full config  {run / '.hydra' / 'config.yaml'} (" in text and "\nmodel:\n  name: " not in text
    assert proc.stdout.index("changed ") < proc.stdout.index("stage 1/3 'head'")
    # the data line names the CPU share torch's threads come from (the run's own environment decides which)
    assert re.search(r"^data: synthetic \|.*\| \d+ thread\(s\) \((CPU affinity|SLURM_CPUS_PER_TASK=\d+|cgroup [^)]*|"
                     r"OMP_NUM_THREADS)\)$", proc.stdout, re.M)


@pytest.mark.slow
def test_stage_two_alone_from_stage_one_weights(smoke_run, cli, tmp_path):
    _, first = smoke_run
    # pretrained=true offline: init_from supplies every tensor, so nothing may be downloaded
    proc = cli("experiment=smoke", "stage=high", "lr=3e-4", f"init_from={first / 'model.pt'}",
               "model.pretrained=true", env={**OFFLINE, "TORCH_HOME": str(tmp_path / "th")})
    assert proc.returncode == 0, proc.stderr
    assert "3.00e-04" in proc.stdout  # the resolved lr is printed before training
    assert not (tmp_path / "th" / "hub" / "checkpoints").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["stage"], r["stage_name"]) for r in rows] == [(2, 2, "high")]
    assert rows[0]["lr"] == pytest.approx(3e-4)
    # started from trained weights: far above what one epoch of stage 2 from scratch reaches (~0.1-0.2)
    assert rows[0]["val_acc"] > 0.5


@pytest.mark.slow
def test_lr_override_scales_every_stage(cli, tmp_path):
    proc = cli("experiment=smoke", "lr=2e-3", "stage=nope")  # fails after resolving: cheap
    assert "stage=nope" in one_error_line(proc)
    from cbam_train.training.schedule import resolve_stages

    cfg = compose_config(["lr=2e-3"])
    assert [s.lr for s in resolve_stages(cfg.schedule.stages, cfg.stage, cfg.lr)] == pytest.approx(
        [2e-3, 2e-4, 2e-5])


@pytest.mark.slow
@pytest.mark.parametrize("args, expect", [(["data.nosuch=1"], "data.nosuch"), (["lr=0"], "lr must be > 0"),
                                          (["-m", "--cfg", "job"], "Only one of --run, --multirun, --cfg")],
                         ids=["hydra_composition", "validation", "hydra_usage"])
def test_a_real_process_exits_2_with_one_line(tmp_path, args, expect):
    """The entry point's contract in a real interpreter (the in-process tests below and test_bad_input.py call
    cli.main() directly): Hydra's own composition error, one of ours and a usage error Hydra raises itself,
    each one line and exit status 2."""
    from conftest import run_cli

    proc = run_cli([*args, "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert expect in one_error_line(proc)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_the_entry_point_imports_neither_torch_nor_torchvision():
    """A config error answers before torch is imported (~2 s of a CPU process's start-up): cbam_train.cli.command and
    what it imports at the top leave torch to the task that needs it."""
    import subprocess
    import sys

    from conftest import child_env

    code = "import sys, cbam_train.cli.command; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# unknown group option / key, wrong type, lr, epochs, stage, trainable, data root: tests/test_bad_input.py
@pytest.mark.parametrize("override, expect", [
    ("data=imagefolder", "data.root"),
    ("task=eval", "task=eval"),
    ("optim.name=rmsprop", "optim.name"),
    ("seed=-1", "seed"),
    ("init_from=/nonexistent/model.pt", "init_from: file not found"),
])
@pytest.mark.slow
def test_bad_override_is_one_line_exit_2(cli, override, expect):
    proc = cli("experiment=smoke", override)
    assert proc.returncode == 2
    assert expect in one_error_line(proc)


@pytest.mark.slow
def test_offline_pretrained_weights_fail_with_the_options(cli, tmp_path):
    proc = cli("experiment=smoke", "model.pretrained=true", "model.width=64",
               env={**OFFLINE, "TORCH_HOME": str(tmp_path / "th")})
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert str(tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in line
    assert "model.weights=PATH" in line and "model.pretrained=false" in line


@pytest.mark.slow
def test_offline_cifar10_download_fails_with_the_options(cli, tmp_path):
    proc = cli("data.root=" + str(tmp_path / "cifar"), "model.pretrained=false", env=OFFLINE)
    assert proc.returncode == 2
    line = one_error_line(proc)
    for hint in ("data.root", "data=imagefolder", "experiment=smoke"):
        assert hint in line


@pytest.mark.slow
@pytest.mark.parametrize("existing", ["metrics.jsonl", ".hydra/overrides.yaml", "train.log"])
def test_existing_run_dir_is_refused_and_left_alone(cli, tmp_path, existing):
    run = tmp_path / "run"
    (run / existing).parent.mkdir(parents=True, exist_ok=True)
    (run / existing).write_text("precious\n")
    proc = cli("experiment=smoke")
    assert proc.returncode == 2
    assert "already holds a run" in one_error_line(proc)
    assert (run / existing).read_text() == "precious\n"
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()) == [existing]


def test_help_lists_every_task_of_the_registry_and_the_groups(tmp_path):
    """--help is built from config/tasks.py: a new task shows there without editing any text."""
    from cbam_train.config.tasks import TASKS

    proc = call_cli(["--help"], tmp_path)
    assert proc.returncode == 0 and not list(tmp_path.iterdir())  # help writes nothing
    lines = proc.stdout.splitlines()
    for name, task in TASKS.items():
        assert any(ln.split() and ln.split()[0] == f"task={name}" and ln.endswith(task.about) for ln in lines), name
    assert any(ln.startswith("data: cifar10, imagefolder, synthetic") for ln in lines)
    assert "powered by Hydra" not in proc.stdout and "cbam-train resume=RUN_DIR" in proc.stdout
