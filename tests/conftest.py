"""Shared fixtures: compose configs the way the CLI does (Hydra compose API), tiny models and data."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from cbam_train.cli.command import find_conf_dir, register_configs
from cbam_train.config.schema import Config
from cbam_train.config.validation import validate

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple) -> DictConfig:
    """Hydra's composition of `overrides` (~0.1-0.2 s each on 2 cores), once per session: read only, never handed
    out (compose_config converts it to new dataclasses each time). A failed composition raises and is not kept."""
    register_configs()
    with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def compose_config(overrides: list | None = None) -> Config:
    """The typed Config that `cbam-train <overrides>` would run with (a new object each call, validated)."""
    return validate(OmegaConf.to_object(_composed(tuple(overrides or []))))


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


@pytest.fixture(scope="session")
def narrow_tv_state():
    """tv_state's layout (torchvision's names, 7x7 conv1, 1000-way fc, no CBAM) at model.width=8: stands in for
    the ImageNet file in runs of the narrow network (NARROW), where loading it is not what is tested."""
    from cbam_train.models import ResNetCBAM

    torch.manual_seed(0)
    return ResNetCBAM(num_classes=1000, stem="imagenet", cbam_enabled=False, width=8).state_dict()


@pytest.fixture
def make_cfg():
    return compose_config


# Inherited from the machine, these would change what a child process does: HYDRA_FULL_ERROR makes Hydra print
# tracebacks instead of the one-line errors the tests expect; torchrun's and submitit's variables (exported by
# some CI pods) would make a plain run join a process group.
SCRUBBED_ENV = ("HYDRA_FULL_ERROR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT")
SCRUBBED_PREFIXES = ("TORCHELASTIC_", "SUBMITIT_", "SLURM_")  # SLURM_: a test suite run inside a SLURM job


def child_threads() -> str:
    """OpenMP threads for a child: the cores this process may use (a cgroup-limited container can see 64 and
    be allowed 2), at most 4; an OMP_NUM_THREADS already set wins."""
    return os.environ.get("OMP_NUM_THREADS") or str(max(1, min(4, len(os.sched_getaffinity(0)))))


# This process's own runs take their threads as a child does (training/device.set_threads leaves torch's count
# alone when OMP_NUM_THREADS is set): the same float summation order in a test's in-process runs and its children's,
# on a machine of any size.
os.environ.setdefault("OMP_NUM_THREADS", child_threads())
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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
    """Run `python -m cbam_train ARGS` in a subprocess (the real CLI), capturing output as text. For tests whose
    subject is the process: signals, torchrun, launcher plugins, the entry point itself. Elsewhere call_cli."""
    return subprocess.run([sys.executable, "-m", "cbam_train", *args], cwd=cwd, env=child_env(env),
                          capture_output=True, text=True, timeout=timeout)


# What a fresh interpreter starts with (Python's documented default filters): the in-process CLI shows the warnings
# a user's terminal would, not pytest's per-test filters.
DEFAULT_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                           ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                           ("ignore", ResourceWarning, None)]


@contextlib.contextmanager
def _as_a_process(args: list, cwd: Path, env: dict | None):
    """argv, cwd, environment, torch threads and stdout/stderr as `python -m cbam_train ARGS` in cwd would have
    them; everything restored after. Yields (stdout, stderr) StringIOs; recorded warnings go to stderr."""
    saved = (sys.argv, os.getcwd(), dict(os.environ), torch.get_num_threads(), sys.stdout, sys.stderr)
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update(env or {})
        torch.set_num_threads(int(child_threads()))  # as a child gets: the same float summation order
        os.chdir(cwd)
        sys.argv, sys.stdout, sys.stderr = ["cbam-train", *args], out, err
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            for action, category, module in DEFAULT_WARNING_FILTERS:
                warnings.filterwarnings(action, category=category, module=module or "")
            try:
                yield out, err
            finally:
                for w in caught:
                    err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    finally:
        sys.argv, cwd_before, env_before, threads, sys.stdout, sys.stderr = saved
        os.chdir(cwd_before)
        os.environ.clear()
        os.environ.update(env_before)
        torch.set_num_threads(threads)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """torch's default float dtype set for the block, restored after (what tests/float64_cli.py does for a whole
    process: cbam_train makes no tensor at import, so a run started inside the block builds all of its own in it)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def call_cli(args: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`cbam-train ARGS` run in this process through cli.main(), returned as run_cli returns a subprocess's
    result (returncode, stdout, stderr). ~3 s cheaper per call than a child, which pays for importing torch;
    for every test whose subject is not the process itself. An exception main() does not turn into an exit
    (a bug: a real process would print its traceback) propagates and fails the test."""
    from cbam_train.cli.command import main

    code: int = 0
    with _as_a_process(list(args), cwd, env) as (out, err):
        try:
            main()
        except SystemExit as e:
            if isinstance(e.code, str):
                err.write(e.code + "\n")
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    return subprocess.CompletedProcess(["cbam-train", *args], code, out.getvalue(), err.getvalue())


def cli_lines(args: list, tmp_path: Path) -> tuple:
    """(exit code, non-empty stderr lines, run dir) of call_cli(ARGS) in tmp_path, whose run dir is tmp_path/run
    unless ARGS name one; a traceback fails the test."""
    run_dir = tmp_path / "run"
    own_dir = any(a.startswith("hydra.run.dir=") for a in args)
    proc = call_cli([*args, *([] if own_dir else [f"hydra.run.dir={run_dir}"])], tmp_path)
    assert "Traceback" not in proc.stderr
    return proc.returncode, [ln for ln in proc.stderr.splitlines() if ln.strip()], run_dir


@pytest.fixture
def cli(tmp_path):
    """Call the CLI in this process (call_cli) with cwd=tmp_path; every call gets hydra.run.dir under tmp_path
    unless given."""
    def _run(*args: str, env: dict | None = None, run_dir: Path | None = None) -> subprocess.CompletedProcess:
        args = list(args)
        if not any(a.startswith("hydra.run.dir=") for a in args):
            args.append(f"hydra.run.dir={run_dir or tmp_path / 'run'}")
        return call_cli(args, cwd=tmp_path, env=env)
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


# The network for every end-to-end test where ResNet18's width is not the subject: all its modules, key names and
# code paths, 1/64 of its weights (a 2 MB checkpoint with Adam state instead of 135 MB) and of its convolutions' work.
NARROW = "model.width=8"

# For runs whose attention pictures are not what a test checks: no stage-end attention report (~1.3 s of drawing
# per stage on 2 cores, most of a tiny run). The reports are drawn and checked by the session's trained run
# (test_explain.py), the smoke run (test_cli.py), the SIGKILL resumes (test_resume.py: a kill may land while one is
# drawn, and the resumed run must still be bit-identical) and the 2-process run (test_distributed.py).
PICTURES_OFF = ["log.attention_report=false"]

# The run task=predict and task=export read (tests/test_predict.py, tests/test_export.py), trained once per session.
SMOKE_RUN = ["experiment=smoke", NARROW, "data.image_size=8", "data.train_size=64", "data.val_size=16",
             "data.test_size=16",
             "data.batch_size=16", "log.mode=plain", "schedule.stages.head.epochs=1", "schedule.stages.high.epochs=1",
             "schedule.stages.full.epochs=1"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A tiny smoke run (3 stages x 1 epoch, 8x8 images, 16 val images) through the CLI: its run dir."""
    tmp = tmp_path_factory.mktemp("trained")
    proc = call_cli(SMOKE_RUN + [f"hydra.run.dir={tmp / 'run'}"], cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


# --- the time budget (docs/TESTING.md) ------------------------------------------------------------------------

BUDGET_S = 5.0  # setup + call + teardown of one test on a 2-core VM; the tests allowed more are listed in the doc
BUDGET_DOC = ROOT / "docs" / "TESTING.md"
_durations: dict = {}


def pytest_runtest_logreport(report) -> None:
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def allowed_over_budget(doc: Path = BUDGET_DOC) -> set:
    """The tests docs/TESTING.md's budget section names (`tests/test_x.py::test_name`, any parametrisation)."""
    import re

    if not doc.is_file():
        return set()
    text = doc.read_text()
    section = text.split("## Budget", 1)[1].split("\n## ", 1)[0] if "## Budget" in text else ""
    return set(re.findall(r"`(tests/[\w/]+\.py::\w+)`", section))


def pytest_terminal_summary(terminalreporter) -> None:
    """Name every test over BUDGET_S that the budget does not list: a report, not a failure (a busy machine is
    slower, and timing is not what a test proves), so each CI log shows where the suite is growing."""
    allowed = allowed_over_budget()
    over = sorted(((t, nodeid) for nodeid, t in _durations.items()
                   if t > BUDGET_S and nodeid.split("[")[0] not in allowed), reverse=True)
    if over:
        terminalreporter.write_sep("-", f"over the {BUDGET_S:g} s budget and not listed in docs/TESTING.md")
        for t, nodeid in over:
            terminalreporter.write_line(f"{t:6.1f}s {nodeid}")
