"""The schema and validate(): bad values fail at start-up with a message naming the key."""

from __future__ import annotations

import pytest
from conftest import compose_config

from cbam_train.config.errors import ConfigError


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
    # ranges added when every key was audited (issue 10)
    ("model.num_classes=1", "model.num_classes must be >= 2 (a classifier needs at least 2 classes)"),
    ("data=synthetic data.num_classes=1", "data.num_classes must be >= 2"),
    ("data=synthetic data.image_size=7", "data.image_size must be >= 8 with model.stem=cifar"),
    ("data=synthetic data.image_size=16 model.stem=imagenet", "data.image_size must be >= 32 with model.stem"),
    ("data.mean=[0.5,0.5,1.5]", "data.mean values must be in [0, 1]"),
    ("data.std=[0.2,0.2,-0.1]", "data.std values must be in (0, 1]"),
    ("data.std=[0.2,0.2,2]", "data.std values must be in (0, 1]"),
    ("data.mean=[0.5,0.5,0.5,0.5]", "data.mean needs 3 values"),
    ("augment.crop.padding=32", "augment.crop.padding must be < data.image_size (32)"),
    ("augment.rotation.degrees=181", "augment.rotation.degrees must be in [0, 180]"),
    ("augment.color_jitter.brightness=-0.1", "augment.color_jitter.brightness must be >= 0"),
    ("optim.momentum=1", "optim.momentum must be in [0, 1)"),
    ("optim.momentum=-0.5", "optim.momentum must be in [0, 1)"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay must be >= 0"),
    ("seed=9223372036854775808", "seed must be >= 0 and <= 9223372036854775807"),
    ("train.label_smoothing=1", "train.label_smoothing must be in [0, 1)"),
    ("train.ema_decay=1", "train.ema_decay must be in (0, 1)"),
    ("schedule.stages.head.sched.min_lr_ratio=1.5", "schedule.stages.head.sched.min_lr_ratio must be in [0, 1]"),
    ("log.every_n_steps=0", "log.every_n_steps must be > 0"),
    ("log.curves_every_s=-1", "log.curves_every_s must be >= 0"),
    ("bench.max_steps=0", "bench.max_steps must be > 0"),
    ("data.eval_batch_size=0", "data.eval_batch_size must be > 0"),
    ("data.augment_chunk=0", "data.augment_chunk must be > 0"),
    ("data.num_workers=-1", "data.num_workers must be >= 0"),
    ("device.threads=0", "device.threads must be in [1, 1024] or null"),
    ("device.threads=2000", "device.threads must be in [1, 1024] or null"),
    ("data.val_size=-1", "data.val_size must be >= 0"),
    ("data.limit=0", "data.limit must be > 0"),
    ("task=tune", "task: unknown value 'tune'; choose one of: train, eval, bench, lr_find"),
    ("lr_find.min_lr=-1e-7", "lr_find.min_lr must be > 0"),
    ("lr_find.max_lr=1e-7", "lr_find.max_lr must be > lr_find.min_lr (1e-07)"),
    ("lr_find.steps=9", "lr_find.steps must be >= 10"),
    ("lr_find.smooth=-0.1", "lr_find.smooth must be in [0, 1)"),
    ("lr_find.smooth=1", "lr_find.smooth must be in [0, 1)"),
    ("lr_find.diverge_factor=0.5", "lr_find.diverge_factor must be > 1"),
])
def test_bad_values_raise_config_error_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        compose_config(override.split())
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides", [[], ["experiment=smoke"], ["optim=sgd", "augment=none", "device=cpu"],
                                       ["data=imagefolder", "data.root=/x", "model.num_classes=3"],
                                       ["task=bench", "device=cuda"], ["task=lr_find", "experiment=smoke"]])
def test_shipped_configs_validate(overrides):
    cfg = compose_config(overrides)
    assert list(cfg.schedule.stages) == ["head", "high", "full"]


def test_every_shipped_yaml_is_tracked_by_git():
    """A .gitignore pattern once hid conf/data from git: a fresh clone then had no data configs."""
    import shutil
    import subprocess

    from conftest import ROOT

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (installed copy): nothing to compare against")
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot list the tracked files")
    # safe.directory: a checkout owned by another user (a bind mount in a container) is still readable
    out = subprocess.run(["git", "-c", f"safe.directory={ROOT}", "ls-files", "conf"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    tracked = set(out.stdout.split())
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert on_disk <= tracked, f"untracked configs: {sorted(on_disk - tracked)}"


# every float the schema holds, with the optional ones set so that they are floats too
ALL_FLOATS_SET = ["lr=1e-3", "train.ema_decay=0.9", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"]


def test_every_float_key_refuses_nan_and_inf():
    """Walks the composed config: a float key added later is covered without a new case. Each key gets nan, inf or
    -inf (in turn) in the composed config, which validate() then checks, as at start-up; that Hydra reads `nan` and
    `inf` on the command line as these floats is tested through the CLI (test_validation.py, test_lr_find.py)."""
    import copy
    import dataclasses

    from cbam_train.config.validation import _floats, validate

    cfg = compose_config(ALL_FLOATS_SET)
    keys = [k for k, _ in _floats(cfg)]
    assert {"lr", "optim.betas[1]", "data.std[2]", "schedule.stages.full.lr", "train.ema_decay",
            "augment.color_jitter.hue", "bench.seconds", "lr_find.min_lr", "lr_find.smooth"} <= set(keys)
    for i, key in enumerate(keys):  # nan, inf and -inf take turns (one isfinite check)
        bad = copy.deepcopy(cfg)
        *path, last = key.replace("[", ".[").split(".")
        node = bad
        for part in path:  # a dataclass field, a dict entry (schedule.stages.<name>) or a list item
            node = node[int(part[1:-1])] if part.startswith("[") else node[part] if isinstance(node, dict) \
                else getattr(node, part)
        value = (float("nan"), float("inf"), float("-inf"))[i % 3]
        if last.startswith("["):
            node[int(last[1:-1])] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            setattr(node, last, value)
        assert dataclasses.is_dataclass(bad)
        with pytest.raises(ConfigError, match="must be a finite number") as e:
            validate(bad)
        assert str(e.value).startswith(f"{key} must be a finite number"), (key, str(e.value))


def test_edges_of_the_ranges_are_accepted():
    compose_config(["augment.rotation.degrees=180", "augment.crop.padding=31", "optim.momentum=0", "seed=0",
                    f"seed={2**63 - 1}", "seed=4294967296", "data.std=[1,1,1]", "data.mean=[0,0,1]", "augment.flip.p=1",
                    "train.label_smoothing=0"])
    compose_config(["data=synthetic", "data.image_size=8", "model.num_classes=2", "data.num_classes=2"])
    compose_config(["data=synthetic", "data.image_size=32", "model.stem=imagenet"])
