"""The schema and validate(): bad values fail at start-up with a message naming the key."""

from __future__ import annotations

import pytest

from cbam_train.config import ConfigError
from conftest import compose_config


@pytest.mark.parametrize("override, message", [
    ("lr=0", "lr must be > 0"),
    ("seed=-1", "seed must be >= 0"),
    ("schedule.stages.full.lr=-1e-5", "schedule.stages.full.lr must be > 0"),
    ("schedule.stages.high.epochs=0", "schedule.stages.high.epochs must be >= 1"),
    ("schedule.stages.head.trainable=[]", "schedule.stages.head.trainable is empty"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("optim.eps=-1", "optim.eps must be > 0"),
    ("optim=sgd optim.momentum=0", "optim.nesterov=true needs optim.momentum > 0"),
    ("data.image_size=16", "CIFAR-10 images are 32x32"),
    ("data.batch_size=0", "data.batch_size must be > 0"),
    ("data.loader=gpu", "data.loader: unknown value 'gpu'"),
    ("data.mean=[0.5,0.5]", "data.mean needs 3 values"),
    ("augment.flip.p=2", "augment.flip.p must be in [0, 1]"),
    ("augment.color_jitter.hue=0.7", "augment.color_jitter.hue"),
    ("model.cbam.kernel_size=4", "model.cbam.kernel_size must be a positive odd number"),
    ("model.cbam.placement=everywhere", "model.cbam.placement: unknown value"),
    ("device.name=tpu", "device.name: unknown value 'tpu'"),
    ("device.precision=fp8", "device.precision: unknown value 'fp8'"),
    ("log.mode=loud", "log.mode: unknown value 'loud'"),
    ("task=eval", "task=eval needs checkpoint=PATH"),
        ("task=bench resume=x", "resume= only applies to task=train"),
        ("train.nan_policy=ignore", "train.nan_policy: unknown value"),
        ("train.checkpoint_every_n_epochs=-1", "train.checkpoint_every_n_epochs must be >= 0"),
        ("eval.split=train", "eval.split: unknown value"),
        ("data=imagefolder data.root=x data.bad_images=fix", "data.bad_images: unknown value"),
])
def test_bad_values_raise_config_error_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        compose_config(override.split())
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides", [[], ["experiment=smoke"], ["optim=sgd", "augment=none", "device=cpu"],
                                       ["data=imagefolder", "data.root=/x", "model.num_classes=3"],
                                       ["task=bench", "device=cuda"]])
def test_shipped_configs_validate(overrides):
    cfg = compose_config(overrides)
    assert list(cfg.schedule.stages) == ["head", "high", "full"]


def test_every_shipped_yaml_is_tracked_by_git():
    """A .gitignore pattern once hid conf/data from git: a fresh clone then had no data configs."""
    import subprocess

    from conftest import ROOT

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (installed copy): nothing to compare against")
    tracked = set(subprocess.run(["git", "ls-files", "conf"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert on_disk <= tracked, f"untracked configs: {sorted(on_disk - tracked)}"
