"""validate() and the data checks through cli.main() in-process (~0.1 s a case instead of ~3 s for a
subprocess): each value that once passed validation or crashed later gets exit 2, one 'error:' line, no
traceback, and nothing written. The file and data cases are in test_bad_input.py; test_cli.py checks the contract
in a real process."""

from __future__ import annotations

import numpy as np
import pytest
from bad_input import argv, folder_args, snapshot, write_images
from PIL import Image

START_UP = [
    ("lr=nan", "lr must be a finite number, got nan"),
    ("lr=inf", "lr must be a finite number, got inf"),
    ("schedule.stages.head.lr=-inf", "schedule.stages.head.lr must be a finite number, got -inf"),
    ("optim.betas=[0.9,nan]", "optim.betas[1] must be a finite number"),
    ("data.mean=[0.5,nan,0.5]", "data.mean[1] must be a finite number"),
    ("augment.flip.p=nan", "augment.flip.p must be a finite number"),
    ("augment.rotation.degrees=inf", "augment.rotation.degrees must be a finite number"),
    ("train.ema_decay=nan", "train.ema_decay must be a finite number"),
    ("log.curves_every_s=inf", "log.curves_every_s must be a finite number"),
    ("bench.seconds=nan", "bench.seconds must be a finite number"),
    ("task=lr_find lr_find.max_lr=nan", "lr_find.max_lr must be a finite number"),
    ("task=lr_find lr_find.steps=3", "lr_find.steps must be >= 10, got 3"),
    ("schedule.stages.head.sched.warmup_epochs=nan", "schedule.stages.head.sched.warmup_epochs must be a finite"),
    ("model.num_classes=1", "model.num_classes must be >= 2"),
    ("data.num_classes=1", "data.num_classes must be >= 2"),
    ("data.image_size=4", "data.image_size must be >= 8 with model.stem=cifar"),
    ("model.stem=imagenet", "data.image_size must be >= 32 with model.stem=imagenet"),
    ("data.mean=[0.5,0.5,3]", "data.mean values must be in [0, 1]"),
    ("data.std=[0.2,0.2,0]", "data.std values must be in (0, 1]"),
    ("augment=flipcrop augment.crop.padding=8", "augment.crop.padding must be < data.image_size (8)"),
    ("augment.rotation.degrees=400", "augment.rotation.degrees must be in [0, 180]"),
    ("augment.policy=randaugment", "augment.policy: unknown value 'randaugment'; choose one of: none, trivial"),
    ("augment.erase.p=1.5", "augment.erase.p must be in [0, 1]"),
    ("augment.erase.scale=[0.5,0.1]", "augment.erase.scale needs 2 values [low, high] with 0 < low <= high <= 1"),
    ("augment.erase.ratio=[0.3]", "augment.erase.ratio needs 2 values [low, high]"),
    ("augment.erase.value=nan", "augment.erase.value must be a finite number"),
    ("augment.cutout.enabled=true augment.cutout.size=9", "augment.cutout.size must be in [1, data.image_size (8)]"),
    ("augment.mix.mixup_alpha=-1", "augment.mix.mixup_alpha must be >= 0"),
    ("augment.mix.prob=2", "augment.mix.prob must be in [0, 1]"),
    ("augment.mix.switch_prob=inf", "augment.mix.switch_prob must be a finite number"),
    ("optim=sgd optim.momentum=1.0", "optim.momentum must be in [0, 1)"),
    ("seed=9223372036854775808", "seed must be >= 0 and <= 9223372036854775807"),
]
AFTER_CLAIM = [  # refused once the data is read: the run dir has its config record, no results
    ("data.batch_size=100", "data.batch_size=100 is larger than the 48 training images"),
    ("data.limit=5", "data.limit=5 is fewer than the 10 classes"),
]


@pytest.mark.parametrize("overrides, phrase", START_UP + AFTER_CLAIM, ids=[o for o, _ in START_UP + AFTER_CLAIM])
def test_bad_value_is_one_line_at_start_up(overrides, phrase, tmp_path, monkeypatch, capsys):
    from cbam_train.cli import command

    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["cbam-train", *argv(None, *overrides.split()), f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as e:
        command.main()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:") and phrase in lines[0], err
    assert "Traceback" not in err
    written = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    assert written == ([] if (overrides, phrase) in START_UP else [".hydra", "train.log"])  # no results


def test_a_class_left_without_training_images_is_refused(tmp_path, monkeypatch, capsys):
    """13 images, val_size=4: the stratified split's largest remainder gives the one 'dog' image to val."""
    from cbam_train.cli import command

    write_images(tmp_path / "imgs" / "train")
    (tmp_path / "imgs" / "train" / "dog").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "train" / "dog" / "0.png")
    before = snapshot([tmp_path / "imgs"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["cbam-train", *folder_args(tmp_path / "imgs", {"model.num_classes": 4,
                                                                                    "data.val_size": 4}),
                                     f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as e:
        command.main()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: class(es) dog have no training images after the validation split")
    assert snapshot([tmp_path / "imgs"]) == before
