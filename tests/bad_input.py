"""The bad-input harness shared by test_bad_input.py (what the CLI reads: data, checkpoints, weights, run
dirs) and test_bad_config.py (what it is told: config values, the override grammar, flags): tiny settings,
input writers, hostile pickles, and check_case, which runs a Case through cli.main and checks its one line."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from conftest import PICTURES_OFF, call_cli
from PIL import Image

# tiny settings: a failing call spends its ~2-4 s on start-up, not on data
BASE = {"experiment": "smoke", "model.width": 8, "data.image_size": 8, "data.train_size": 64, "data.val_size": 16,
        "data.test_size": 16, "data.batch_size": 16, "log.mode": "plain",
        **dict(o.split("=") for o in PICTURES_OFF)}
ONE_EPOCH_PER_STAGE = {"schedule.stages.head.epochs": 1, "schedule.stages.high.epochs": 1,
                       "schedule.stages.full.epochs": 1, "train.checkpoint_every_n_epochs": 0}
CLASSES = ("ant", "bee", "cat")


def argv(changes: Optional[dict] = None, *extra: str) -> list:
    """BASE with `changes` applied (a value of None drops the key), as key=value overrides, then `extra`."""
    merged = {**BASE, **(changes or {})}
    return [f"{k}={v}" for k, v in merged.items() if v is not None] + list(extra)


def folder_args(root: Path, changes: Optional[dict] = None, *extra: str) -> list:
    """Overrides for a tiny 3-class image folder at root (12 images of 8x8)."""
    return argv({"data": "imagefolder", "data.root": root, "model.num_classes": 3, "data.val_size": 3,
                 "data.batch_size": 4, **(changes or {})}, *extra)


def write_images(split_dir: Path, per_class: int = 4, size: int = 8) -> list:
    """split_dir/<class>/img<k>.png: noise whose red channel lies in a band per class; returns the paths."""
    rng = np.random.default_rng(0)
    paths = []
    for c, name in enumerate(CLASSES):
        (split_dir / name).mkdir(parents=True)
        for k in range(per_class):
            a = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            a[..., 0] = rng.integers(c * 90, c * 90 + 60, size=(size, size), dtype=np.uint8)
            Image.fromarray(a).save(split_dir / name / f"img{k}.png")
            paths.append(split_dir / name / f"img{k}.png")
    return paths


def fake_run_dir(folder: Path, overrides: list) -> Path:
    """A folder that looks like a run dir to the CLI (.hydra/overrides.yaml), so eval takes its config."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return folder


class _Hostile:
    """Unpickling this calls open(path, 'w'): it creates a file (a stand-in for running arbitrary code)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def hostile_file(path: Path, marker: Path, proof: Path) -> Path:
    """torch.save a hostile object to path; first prove that loading such a file the trusting way runs it."""
    torch.save(_Hostile(str(proof)), path.with_name("proof.pt"))
    torch.load(path.with_name("proof.pt"), weights_only=False).close()
    assert proof.exists()
    path.with_name("proof.pt").unlink()
    torch.save({"model": _Hostile(str(marker))}, path)
    return path


def snapshot(paths) -> dict:
    """{path: (sha1, mtime_ns)} of every file at or under paths (folders: None), to prove nothing changed."""
    out = {}
    for p in map(Path, paths):
        for f in ([p] if p.is_file() else [p, *sorted(p.rglob("*"))] if p.is_dir() else []):
            out[str(f)] = (hashlib.sha1(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) if f.is_file() else None
    return out


@dataclass
class Case:
    args: list
    phrases: tuple  # each must appear in the one error line (the warning line when code == 0)
    code: int = 2
    watch: tuple = ()  # files / folders given to the CLI: must come out byte-identical (and nothing added)
    marker: Optional[Path] = None  # a file the CLI must not create


# a case: (work folder, trained run on demand) -> Case
Maker = Callable[[Path, Callable[[], Path]], Case]


def config_case(override: str, *phrases: str) -> Maker:
    return lambda tmp, trained: Case(argv(None, override), phrases)


def overrides_case(changes: Optional[dict], *phrases: str, flags: tuple = ()) -> Maker:
    """Overrides (BASE with `changes`) after command-line flags, where argparse takes them."""
    return lambda tmp, trained: Case([*flags, *argv(changes)], phrases)

def check_case(case: Case, tmp_path: Path) -> None:
    """Run the case through cli.main in this process (test_cli.py runs the entry point's contract for real):
    exit status, one line (error:, or warning: for a run that succeeds), no traceback, the watched inputs
    byte-identical and the marker file not created."""
    before = snapshot(case.watch)
    assert before or not case.watch  # the watched inputs exist
    args = case.args + ([] if any(a.startswith("hydra.run.dir=") for a in case.args)
                        else [f"hydra.run.dir={tmp_path / 'run'}"])
    proc = call_cli(args, cwd=tmp_path)

    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == case.code, proc.stderr
    if case.code == 0:  # a run that succeeds despite the input, saying so once
        assert len(lines) == 1 and lines[0].startswith("warning:"), proc.stderr
        assert (tmp_path / "run" / "model.pt").is_file()
    else:
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for phrase in case.phrases:
        assert phrase in lines[0]

    after = snapshot(case.watch)
    if case.code == 0:  # a successful run may add files (the decode cache), never change one
        assert {k: after.get(k) for k in before} == before
    else:
        assert after == before
    if case.marker is not None:
        assert not case.marker.exists(), "unpickling the checkpoint ran code"
