"""`cbam-train task=eval checkpoint=PATH` through cli.main, on a tiny trained run: eval.json's numbers
agree with what training measured on the same model and data, and the eval never writes into a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import NARROW, PICTURES_OFF, SMOKE_RUN, call_cli
from PIL import Image

from cbam_train.data.datasets import make_synthetic

pytestmark = pytest.mark.slow  # every test here evaluates through cli.main, on the session's trained run

TINY = SMOKE_RUN  # the session's trained run's settings (conftest.trained)
EVAL_KEYS = {"accuracy", "loss", "per_class", "confusion", "n", "classes", "split", "checkpoint"}


def files_of(folder: Path) -> dict:
    """{relative path: (size, mtime_ns)} of every file under folder."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(proc) -> str:
    """The one 'error:' line of a failed run (no traceback anywhere)."""
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def evaluate(checkpoint: Path, out: Path, *extra: str):
    """Run `cbam-train task=eval checkpoint=...` into run dir `out`; (process, eval.json or None)."""
    proc = call_cli(["task=eval", f"checkpoint={checkpoint}", *extra, f"hydra.run.dir={out}"], cwd=out.parent)
    result = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else None
    return proc, result


@pytest.fixture(scope="module")
def trained(trained):
    """The session's tiny synthetic run (conftest.trained: 3 stages x 1 epoch, 8x8 images, 16 val and 16 test
    images), with its files as this module found them: (run dir, files)."""
    assert (trained / "model.pt").is_file() and (trained / "checkpoints" / "last.pt").is_file()
    return trained, files_of(trained)


@pytest.fixture(scope="module")
def model_eval(trained, tmp_path_factory):
    """model.pt evaluated on the test split (the default): (process, eval run dir, eval.json)."""
    out = tmp_path_factory.mktemp("eval") / "run"
    proc, result = evaluate(trained[0] / "model.pt", out)
    assert proc.returncode == 0, proc.stderr
    return proc, out, result


def test_eval_json_holds_accuracy_loss_per_class_and_confusion(trained, model_eval):
    run, _ = trained
    _, _, ev = model_eval
    summary = json.loads((run / "summary.json").read_text())
    assert EVAL_KEYS <= set(ev)
    assert ev["split"] == "test" and ev["n"] == 16
    assert ev["classes"] == summary["classes"] == [f"class{i}" for i in range(10)]
    confusion = np.array(ev["confusion"])
    assert confusion.shape == (10, 10) and confusion.dtype.kind == "i" and (confusion >= 0).all()
    assert confusion.sum() == ev["n"]
    # rows are the true classes: their sums are the test split's label counts (the generator's own labels)
    _, labels = make_synthetic(16, 10, 8, 0, 0 + 2)
    np.testing.assert_array_equal(confusion.sum(1), np.bincount(labels, minlength=10))
    assert ev["accuracy"] == np.trace(confusion) / ev["n"]
    for i, c in enumerate(ev["classes"]):
        row = confusion[i].sum()
        assert ev["per_class"][c] == (confusion[i, i] / row if row else None), c
    # the same model on the same data through the same evaluation: what training reported, to the bit
    assert ev["accuracy"] == summary["test_acc"]
    assert ev["loss"] == summary["test_loss"]


def test_eval_draws_the_confusion_matrix_and_the_top_losses(model_eval):
    """confusion.png and top_losses.png (fastai's ClassificationInterpretation); eval.json lists the 16 images
    drawn, highest loss first, and their losses average to at least the split's mean loss."""
    _, out, ev = model_eval
    worst = ev["top_losses"]
    assert len(worst) == min(16, ev["n"])
    losses = [r["loss"] for r in worst]
    assert losses == sorted(losses, reverse=True) and sum(losses) / len(losses) >= ev["loss"] - 1e-6
    assert all(r["true"] in ev["classes"] and r["pred"] in ev["classes"] and 0 < r["prob"] <= 1 for r in worst)
    assert sum(r["true"] != r["pred"] for r in worst) == ev["n"] - round(ev["accuracy"] * ev["n"])  # every error
    for name in ("confusion.png", "top_losses.png"):
        with Image.open(out / name) as im:
            im.verify()
    with Image.open(out / "top_losses.png") as im:
        assert im.size == (round(100 * 1.45 * 1.3 * 4), round(100 * (1.45 * 1.45 * 4 + 0.4)))


def test_eval_on_val_split_matches_the_last_epochs_val_acc(trained, tmp_path):
    run, _ = trained
    proc, ev = evaluate(run / "model.pt", tmp_path / "run", "eval.split=val")
    assert proc.returncode == 0, proc.stderr
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert ev["split"] == "val" and ev["n"] == 16
    assert ev["accuracy"] == last["val_acc"]
    assert ev["loss"] == last["val_loss"]
    assert np.array(ev["confusion"]).sum() == 16


def test_eval_of_checkpoints_last_pt_matches_model_pt(trained, model_eval, tmp_path):
    run, _ = trained
    proc, ev = evaluate(run / "checkpoints" / "last.pt", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    _, _, from_model = model_eval
    assert ev["checkpoint"] == str(run / "checkpoints" / "last.pt")
    assert (ev["accuracy"], ev["loss"], ev["confusion"]) == \
        (from_model["accuracy"], from_model["loss"], from_model["confusion"])


def test_eval_writes_its_own_run_dir_and_leaves_the_training_run_alone(trained, model_eval):
    run, files_after_training = trained
    proc, out, ev = model_eval
    assert out != run
    assert (out / "eval.json").is_file() and (out / "train.log").is_file()
    assert (out / ".hydra" / "overrides.yaml").is_file()
    assert ev["checkpoint"] == str(run / "model.pt")
    assert f"wrote {out / 'eval.json'}" in proc.stdout
    assert not (run / "eval.json").exists()
    assert files_of(run) == files_after_training  # nothing added, rewritten or touched in the training run


def test_eval_refuses_a_run_dir_that_holds_eval_json(trained, tmp_path):
    run, _ = trained
    out = tmp_path / "run"
    out.mkdir()
    (out / "eval.json").write_text('{"accuracy": 0.99}\n')
    before = files_of(out)
    proc, _ = evaluate(run / "model.pt", out)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "already holds" in line and "eval.json" in line and "hydra.run.dir=" in line
    assert (out / "eval.json").read_text() == '{"accuracy": 0.99}\n'
    assert files_of(out) == before


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A run trained on a 3-class image folder with train/ only (no test/): (run dir, image folder)."""
    tmp = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("ant", "bee", "cat")):
        (tmp / "imgs" / "train" / name).mkdir(parents=True)
        for k in range(4):
            a = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            a[..., 0] = rng.integers(c * 90, c * 90 + 60, size=(8, 8), dtype=np.uint8)
            Image.fromarray(a).save(tmp / "imgs" / "train" / name / f"img{k}.png")
    proc = call_cli(["experiment=smoke", NARROW, "data=imagefolder", f"data.root={tmp / 'imgs'}", "data.image_size=8",
                    "data.val_size=3", "data.batch_size=4", "model.num_classes=3", "log.mode=plain",
                    "schedule.stages.head.epochs=1", "schedule.stages.high.epochs=1", "schedule.stages.full.epochs=1",
                    "train.checkpoint_every_n_epochs=0", *PICTURES_OFF, f"hydra.run.dir={tmp / 'run'}"], cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp / "run", tmp / "imgs"


def test_eval_on_image_folder_without_test_split_suggests_val(folder_run, tmp_path):
    run, imgs = folder_run
    assert not (imgs / "test").exists()
    proc, ev = evaluate(run / "model.pt", tmp_path / "test_split")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "eval.split=test" in line and "use eval.split=val" in line
    assert ev is None
    # the hint works: the same checkpoint on the val split, as training measured it
    proc, ev = evaluate(run / "model.pt", tmp_path / "val_split", "eval.split=val")
    assert proc.returncode == 0, proc.stderr
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert ev["classes"] == ["ant", "bee", "cat"] and ev["n"] == 3
    assert np.array(ev["confusion"]).sum(1).tolist() == [1, 1, 1]  # the stratified val split: one per class
    assert ev["accuracy"] == last["val_acc"]
