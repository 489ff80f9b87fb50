"""Shared fixtures: compose configs the way the CLI does (Hydra compose API), tiny models and data."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cbam_train.cli import find_conf_dir, register_configs
from cbam_train.config import Config
from cbam_train.validation import validate

ROOT = Path(__file__).resolve().parents[1]


def compose_config(overrides: list | None = None) -> Config:
    """The typed Config that `cbam-train <overrides>` would run with."""
    register_configs()
    with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
        dcfg = compose(config_name="config", overrides=list(overrides or []))
    return validate(OmegaConf.to_object(dcfg))


def assert_same_state(a: dict, b: dict) -> None:
    """Same keys in the same order, same dtypes, equal tensors."""
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="session")
def tv_state():
    """A torchvision resnet18 state dict (random weights, seeded): stands in for the ImageNet file."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


@pytest.fixture
def make_cfg():
    return compose_config


# Inherited from the machine, these would change what a child process does: HYDRA_FULL_ERROR makes Hydra print
# tracebacks instead of the one-line errors the tests expect; torchrun's and submitit's variables (exported by
# some CI pods) would make a plain run join a process group.
SCRUBBED_ENV = ("HYDRA_FULL_ERROR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT")
SCRUBBED_PREFIXES = ("TORCHELASTIC_", "SUBMITIT_")


def child_threads() -> str:
    """OpenMP threads for a child: the cores this process may use (a cgroup-limited container can see 64 and
    be allowed 2), at most 4; an OMP_NUM_THREADS already set wins."""
    return os.environ.get("OMP_NUM_THREADS") or str(max(1, min(4, len(os.sched_getaffinity(0)))))


def child_env(extra: dict | None = None) -> dict:
    """The environment for a child process of the tests: the machine's, less what would change the run."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV and not k.startswith(SCRUBBED_PREFIXES)}
    return {**env, "PYTHONUNBUFFERED": "1", "TERM": "dumb", "OMP_NUM_THREADS": child_threads(), **(extra or {})}


@pytest.fixture(autouse=True)
def _python_subprocesses_only_in_slow_tests(request, monkeypatch):
    """`make test-fast` (-m "not slow") must stay fast: a Python child pays ~3 s for importing torch alone.
    A test that starts one without the `slow` marker fails here, naming the fix."""
    if request.node.get_closest_marker("slow") is not None:
        return
    real_init = subprocess.Popen.__init__

    def guarded(self, args, *a, **k):
        argv = [args] if isinstance(args, (str, os.PathLike)) else list(args)
        if argv and (Path(str(argv[0])).name.startswith(("python", "cbam-train", "torchrun"))
                     or str(argv[0]) == sys.executable):
            raise AssertionError(f"{request.node.nodeid} starts a Python subprocess: mark it @pytest.mark.slow")
        real_init(self, args, *a, **k)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


@pytest.fixture(autouse=True)
def _no_inherited_process_group(monkeypatch):
    """In-process runs read WORLD_SIZE/RANK too (distributed.from_env): a test never inherits a process group."""
    for key in SCRUBBED_ENV:
        monkeypatch.delenv(key, raising=False)
    for key in [k for k in os.environ if k.startswith(SCRUBBED_PREFIXES)]:
        monkeypatch.delenv(key)


def run_cli(args: list, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m cbam_train ARGS` in a subprocess (the real CLI), capturing output as text."""
    return subprocess.run([sys.executable, "-m", "cbam_train", *args], cwd=cwd, env=child_env(env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli(tmp_path):
    """Call the CLI with cwd=tmp_path; every call gets hydra.run.dir under tmp_path unless given."""
    def _run(*args: str, env: dict | None = None, run_dir: Path | None = None) -> subprocess.CompletedProcess:
        args = list(args)
        if not any(a.startswith("hydra.run.dir=") for a in args):
            args.append(f"hydra.run.dir={run_dir or tmp_path / 'run'}")
        return run_cli(args, cwd=tmp_path, env=env)
    return _run


# --- CIFAR-10's python pickle batches, written by the tests (the real download is unreachable here) ----

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 20


def _write_pickle(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))  # the original files are protocol-2 pickles


def write_cifar(root: Path, meta_key="label_names", meta_names=None, per_batch: int = PER_BATCH) -> dict:
    """Write root/cifar-10-batches-py in CIFAR-10's python format; return what was written."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int((b * per_batch + i) % 10) for i in range(per_batch)]
        _write_pickle(base / name, {b"batch_label": f"batch {b}".encode(), b"labels": labels, b"data": data,
                                    b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)]})
        written[name] = (data, labels)
    names = meta_names if meta_names is not None else [n.encode() for n in CIFAR_NAMES]
    _write_pickle(base / "batches.meta", {meta_key: names, b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return written


# The run task=predict and task=export read (tests/test_predict.py, tests/test_export.py), trained once per session.
SMOKE_RUN = ["experiment=smoke", "data.image_size=8", "data.train_size=64", "data.val_size=16", "data.test_size=16",
             "data.batch_size=16", "log.mode=plain", "schedule.stages.head.epochs=1", "schedule.stages.high.epochs=1",
             "schedule.stages.full.epochs=1"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A tiny smoke run (3 stages x 1 epoch, 8x8 images, 16 val images) through the CLI: its run dir."""
    tmp = tmp_path_factory.mktemp("trained")
    proc = run_cli(SMOKE_RUN + [f"hydra.run.dir={tmp / 'run'}"], cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"
