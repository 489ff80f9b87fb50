"""task=explain through cli.main on the session's smoke-trained run, the stage-end attention report that run
wrote (log.attention_report is on by default), and bad checkpoints refused with one line, as task=eval does."""

from __future__ import annotations

import json

import pytest
from bad_input import hostile_file
from conftest import call_cli
from PIL import Image

pytestmark = pytest.mark.slow  # task=explain through cli.main, on the session's trained run


def explain(checkpoint, out, *extra):
    return call_cli(["task=explain", f"checkpoint={checkpoint}", *extra, f"hydra.run.dir={out}"], cwd=out.parent)


def one_error_line(proc) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_explain_writes_the_three_files_and_leaves_the_run_alone(trained, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in trained.rglob("*") if p.is_file()}
    out = tmp_path / "explain"
    proc = explain(trained / "checkpoints" / "last.pt", out, "explain.per_class=1", "log.mode=plain")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "attention.json").read_text())
    classes = json.loads((trained / "summary.json").read_text())["classes"]
    # the fixed set: the first image of each class in the val split, classes in order (16 val images, 10 classes)
    assert [r["true"] for r in report["images"]] == sorted({r["true"] for r in report["images"]}, key=classes.index)
    assert report["split"] == "val" and report["n"] == len(report["images"]) >= 5
    assert [m["name"] for m in report["modules"]] == ["layer1", "layer2", "layer3", "layer4"]
    assert report["init"] == "identity" and report["reference"] == 1.0
    assert all(m["channel_drift"] >= 0 and m["spatial_drift"] >= 0 for m in report["modules"])
    with Image.open(out / "attention.png") as im:  # a row per image; input + 4 gates + Grad-CAM columns
        assert im.size == (round(100 * 1.45 * 6), round(100 * (1.45 * report["n"] + 0.7)))
    with Image.open(out / "gates.png") as im:
        assert im.size[0] == round(100 * 3.1 * 4)
    assert "channel drift" in proc.stdout and "wrote" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in trained.rglob("*") if p.is_file()} == before


def test_the_training_run_wrote_an_attention_report_at_each_stage_end(trained):
    pictures = sorted(p.name for p in (trained / "attention").iterdir())
    assert pictures == ["stage1-head-gates.png", "stage1-head.png", "stage2-high-gates.png", "stage2-high.png",
                        "stage3-full-gates.png", "stage3-full.png"]
    rows = [json.loads(line) for line in (trained / "attention.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["module"]) for r in rows] == [(s, f"layer{k}") for s in (1, 2, 3) for k in range(1, 5)]
    assert [r["epoch"] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4
    for p in (trained / "attention").iterdir():
        with Image.open(p) as im:
            im.verify()
    log = (trained / "train.log").read_text()
    assert log.count("attention report: ") == 3


@pytest.mark.parametrize("make, phrase", [
    (lambda tmp, run: tmp / "nope" / "model.pt", "no such"),
    (lambda tmp, run: hostile_file(tmp / "evil.pt", tmp / "pwned.txt", tmp / "proof.txt"), "checkpoint="),
])
def test_explain_refuses_a_missing_or_hostile_checkpoint(trained, tmp_path, make, phrase):
    path = make(tmp_path, trained)
    proc = explain(path, tmp_path / "out")
    line = one_error_line(proc)
    assert phrase in line and str(path) in line
    assert not (tmp_path / "pwned.txt").exists()
    assert not (tmp_path / "out" / "attention.json").exists()
