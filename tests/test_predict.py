"""task=predict: which files `inputs=` names, how an image is read (as training reads it), predictions.csv,
bad input as one line, and through cli.main on a smoke-trained run: the same classes per
image as the evaluation code gives on the val split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_input import hostile_file
from conftest import NARROW, SMOKE_RUN, call_cli, cli_lines, compose_config
from PIL import Image

from cbam_train.config.errors import ConfigError, PredictError
from cbam_train.data.datasets import build_splits
from cbam_train.data.imagefolder import ImageFiles, decode_image
from cbam_train.data.loaders import build_eval_loader
from cbam_train.models import build_model
from cbam_train.tasks.predict import find_inputs, predictions_csv
from cbam_train.training.engine import evaluate

TINY = SMOKE_RUN  # the trained run's own settings (conftest.trained)


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def noise(h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- inputs=

def test_inputs_file_folder_and_glob(tmp_path):
    a = save_png(tmp_path / "imgs" / "a.png", noise())
    b = save_png(tmp_path / "imgs" / "deep" / "er" / "b.jpg", noise())
    save_png(tmp_path / "imgs" / ".hidden" / "c.png", noise())
    (tmp_path / "imgs" / "notes.txt").write_text("not an image\n")
    assert find_inputs(str(a)) == [a]
    assert find_inputs(str(tmp_path / "imgs")) == [a, b]  # recursive, sorted, hidden and non-image files left out
    assert find_inputs(str(tmp_path / "imgs" / "**" / "*.jpg")) == [b]
    assert find_inputs(str(tmp_path / "imgs" / "*.png")) == [a]


@pytest.mark.parametrize("make, phrase", [
    (lambda t: (t / "empty").mkdir() or t / "empty", "the folder holds no images"),
    (lambda t: t / "*.nothing", "the glob matches no file"),
    (lambda t: t / "absent.png", "no such file or folder"),
])
def test_inputs_that_name_nothing_are_refused(tmp_path, make, phrase):
    spec = str(make(tmp_path))
    with pytest.raises(PredictError) as e:
        find_inputs(spec)
    assert str(e.value).startswith(f"inputs={spec}: {phrase}") and "\n" not in str(e.value)


# ---------------------------------------------------------------- reading an image

def test_images_are_read_as_training_reads_them(tmp_path):
    """Greyscale -> RGB; 8 wide x 16 tall at image_size 8: the shorter side is already 8, so no resize, and the
    centre crop keeps rows 4..11. A larger image is resized (shorter side) first, as ImageFiles does."""
    rows = (np.arange(16, dtype=np.uint8) * 10)[:, None].repeat(8, 1)  # pixel value = 10 x row
    img, err = decode_image(save_png(tmp_path / "tall.png", rows), 8)
    assert err is None and img.dtype == torch.uint8 and img.shape == (3, 8, 8)
    assert img[0, :, 0].tolist() == [10 * r for r in range(4, 12)] and torch.equal(img[0], img[2])
    big = save_png(tmp_path / "big.jpg", noise(40, 30, seed=1))
    files = ImageFiles([big, tmp_path / "tall.png"], 8)
    assert torch.equal(decode_image(big, 8)[0], files(0)) and decode_image(big, 8)[0].shape == (3, 8, 8)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    image, why = decode_image(tmp_path / "bad.png", 8)
    assert image is None and "cannot identify" in why


def test_predictions_csv_has_a_row_per_file_and_the_error_column():
    rows = [{"path": "a.png", "classes": ["cat", "dog"], "probs": [0.75, 0.25], "error": ""},
            {"path": "b.png", "classes": [], "probs": [], "error": "cannot identify image file"}]
    parsed = list(csv.reader(predictions_csv(rows, 2).splitlines()))
    assert parsed[0] == ["path", "pred", "prob", "top1", "top1_prob", "top2", "top2_prob", "error"]
    assert parsed[1] == ["a.png", "cat", "0.750000", "cat", "0.750000", "dog", "0.250000", ""]
    assert parsed[2] == ["b.png", "", "", "", "", "", "", "cannot identify image file"]


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("overrides, message", [
    ("task=predict inputs=x", "task=predict needs checkpoint=PATH"),
    ("task=predict checkpoint=x", "task=predict needs inputs=PATH"),
    ("predict.top_k=0", "predict.top_k must be >= 1 and <= the number of classes (10), got 0"),
    ("task=predict checkpoint=x inputs=y predict.top_k=11",
     "predict.top_k must be >= 1 and <= the number of classes (10), got 11; set predict.top_k=10"),
    ("task=predict checkpoint=x inputs=y model.num_classes=2 data=synthetic data.num_classes=2",
     "predict.top_k must be >= 1 and <= the number of classes (2), got 3; set predict.top_k=2"),
    ("predict.batch_size=0", "predict.batch_size must be > 0"),
])
def test_predict_keys_are_validated_at_start_up(overrides, message):
    with pytest.raises(ConfigError) as e:
        compose_config(overrides.split())
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_two_class_training_run_is_not_refused_for_the_default_top_k():
    assert compose_config(["data=synthetic", "model.num_classes=2", "data.num_classes=2"]).predict.top_k == 3


# ---------------------------------------------------------------- bad input, in-process through cli.main

def cli_main(argv: list, tmp_path: Path) -> tuple:
    """conftest.cli_lines of `cbam-train ARGV log.mode=plain`: (exit code, stderr lines, run dir)."""
    return cli_lines([*argv, "log.mode=plain"], tmp_path)


@pytest.fixture
def random_model(tmp_path) -> Path:
    """A random smoke-config model.pt (model.width=8: a run takes it with NARROW) with a summary.json beside it
    (classes, normalisation), no run dir."""
    torch.manual_seed(0)
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(build_model(compose_config(["experiment=smoke", NARROW]).model).state_dict(), folder / "model.pt")
    (folder / "summary.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(10)],
                                                     "data_mean": [0.5] * 3, "data_std": [0.25] * 3}))
    return folder / "model.pt"


def _empty(tmp, model):
    (tmp / "empty").mkdir()
    return [f"checkpoint={model}", f"inputs={tmp / 'empty'}"], "the folder holds no images"


def _glob(tmp, model):
    return [f"checkpoint={model}", f"inputs={tmp / 'none' / '*.jpg'}"], "the glob matches no file"


def _missing_checkpoint(tmp, model):
    return [f"checkpoint={tmp / 'gone.pt'}", f"inputs={tmp}"], "no such checkpoint file"


def _hostile(tmp, model):
    path = hostile_file(tmp / "evil.pt", tmp / "pwned.txt", tmp / "proof.txt")
    return [f"checkpoint={path}", f"inputs={tmp}"], "refused by the weights-only loader"


def _all_unreadable(tmp, model):
    (tmp / "bad").mkdir()
    (tmp / "bad" / "x.jpg").write_bytes(b"not a jpeg")
    return [f"checkpoint={model}", f"inputs={tmp / 'bad'}"], "none of the 1 file(s) could be read"


def _unwritable(tmp, model):
    (tmp / "afile").write_text("a file, not a folder\n")
    save_png(tmp / "imgs" / "a.png", noise())
    return [f"checkpoint={model}", f"inputs={tmp / 'imgs'}", f"hydra.run.dir={tmp / 'afile' / 'run'}"], \
        "cannot create the run dir"


@pytest.mark.parametrize("make", [_empty, _glob, _missing_checkpoint, _hostile, _all_unreadable, _unwritable])
def test_bad_predict_input_is_one_line(make, random_model, tmp_path):
    args, phrase = make(tmp_path, random_model)
    code, lines, run_dir = cli_main(["task=predict", NARROW, *args], tmp_path)
    if make is _all_unreadable:  # the run happened: a row per file, then the error
        assert lines[0].startswith("warning: 1 of 1 file(s) could not be read")
        assert (run_dir / "predictions.csv").read_text().count("\n") == 2
        lines = lines[1:]
    else:
        assert not run_dir.exists() or not any(run_dir.iterdir())  # refused before anything was written
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and phrase in lines[0], lines
    assert not (tmp_path / "pwned.txt").exists()


# ---------------------------------------------------------------- the real CLI on a trained run

def read_csv(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_predicting_the_val_images_gives_evaluations_classes(trained, tmp_path):
    """The val split written as PNG files (lossless, already 8x8) and predicted through the CLI: per image the
    class the evaluation loader + model give, and the confusion matrix engine.evaluate (task=eval's) counts."""
    cfg = compose_config(TINY)
    summary = json.loads((trained / "summary.json").read_text())
    splits = build_splits(cfg.data, cfg.seed, cfg.model.num_classes)
    images, labels = splits.val.materialize()
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        save_png(tmp_path / "val" / summary["classes"][y] / f"{i:03d}.png", img.permute(1, 2, 0).numpy())
    proc = call_cli(["task=predict", f"checkpoint={trained / 'model.pt'}", f"inputs={tmp_path / 'val'}",
                    "predict.batch_size=5", "log.mode=plain", f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert len(rows) == 16 and all(r["error"] == "" for r in rows)

    model = build_model(cfg.model)
    model.load_state_dict(torch.load(trained / "model.pt", weights_only=True))
    model.eval()
    loader = build_eval_loader(splits.val, cfg.data, "memory", torch.device("cpu"), summary["data_mean"],
                               summary["data_std"], 0)
    with torch.inference_mode():
        logits = torch.cat([model(x) for x, _ in loader])
    by_index = {int(Path(r["path"]).stem): r for r in rows}
    assert [by_index[i]["pred"] for i in range(16)] == [summary["classes"][c] for c in logits.argmax(1).tolist()]
    probs = logits.softmax(1)
    for i in range(16):  # top-k in order, probabilities as the csv rounds them
        top = probs[i].topk(3)
        assert [by_index[i][f"top{k + 1}"] for k in range(3)] == [summary["classes"][c] for c in top.indices]
        assert [float(by_index[i][f"top{k + 1}_prob"]) for k in range(3)] == pytest.approx(top.values.tolist(),
                                                                                           abs=1e-6)
    confusion = np.zeros((10, 10), dtype=int)
    for r in rows:
        confusion[summary["classes"].index(Path(r["path"]).parent.name), summary["classes"].index(r["pred"])] += 1
    assert confusion.tolist() == evaluate(model, loader, torch.device("cpu"), num_classes=10)["confusion"]


@pytest.mark.slow
def test_an_unreadable_file_gets_its_row_and_the_rest_are_predicted(trained, tmp_path):
    for i in range(3):
        save_png(tmp_path / "imgs" / f"img{i}.png", noise(24, 17, seed=i))  # not 8x8: resized and cropped
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    proc = call_cli(["task=predict", f"checkpoint={trained / 'checkpoints' / 'last.pt'}", f"inputs={tmp_path / 'imgs'}",
                    "predict.top_k=2", "log.mode=plain", f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert [Path(r["path"]).name for r in rows] == ["broken.jpg", "img0.png", "img1.png", "img2.png"]
    assert rows[0]["pred"] == "" and rows[0]["error"] and all(r["error"] == "" for r in rows[1:])
    assert list(rows[0]) == ["path", "pred", "prob", "top1", "top1_prob", "top2", "top2_prob", "error"]
    assert all(r["pred"].startswith("class") and r["pred"] == r["top1"] for r in rows[1:])
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("warning: 1 of 4 file(s) could not be read")
    out = proc.stdout
    assert "\x1b[" not in out and "predictions (first 4 of 4)" in out and "images per predicted class" in out
    assert "predicted 3 of 4 image(s)" in out and f"wrote {tmp_path / 'out' / 'predictions.csv'}" in out
    assert (tmp_path / "out" / ".hydra" / "overrides.yaml").is_file()
