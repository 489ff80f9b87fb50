"""The experiment presets compose to what they promise and run at smoke size; EMA and flip TTA."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import NARROW, PICTURES_OFF, compose_config

from cbam_train.models import build_model
from cbam_train.training.train import run

POST_MEAN, POST_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]  # the post's transforms.Normalize
SMALL = ["data=synthetic", NARROW, "data.image_size=8", "data.train_size=96", "data.val_size=32", "data.test_size=32",
         "data.batch_size=16", "data.num_classes=10", "device=cpu", "log.mode=quiet", *PICTURES_OFF]


def test_seed_preset_is_the_recipe_as_published():
    cfg = compose_config(["experiment=seed", "data.root=/x"])
    assert cfg.model.pretrained and cfg.model.cbam.init == "seed" and cfg.model.cbam.placement == "stage"
    assert cfg.model.stem == "cifar" and not cfg.schedule.freeze_bn
    assert cfg.optim.name == "adam" and cfg.data.batch_size == 64 and cfg.augment.name == "seed"
    assert [(n, s.epochs, s.lr, s.trainable) for n, s in cfg.schedule.stages.items()] == [
        ("head", 5, 1e-3, ["fc", "cbam"]), ("high", 15, 1e-4, ["fc", "cbam", "layer3", "layer4"]),
        ("full", 30, 1e-5, ["all"])]
    assert (cfg.data.mean, cfg.data.std) == (POST_MEAN, POST_STD)


def test_seed_code_preset_is_the_posts_code():
    cfg = compose_config(["experiment=seed_code", "data.root=/x"])
    assert cfg.model.pretrained and cfg.model.cbam.init == "seed" and cfg.model.stem == "cifar"
    assert cfg.optim.name == "adam" and cfg.data.batch_size == 64 and cfg.augment.name == "seed"
    [(name, st)] = cfg.schedule.stages.items()
    assert (name, st.epochs, st.lr, st.trainable) == ("all", 50, 1e-3, ["all"])
    assert (st.sched.name, st.sched.step_size, st.sched.gamma, st.sched.warmup_epochs) == ("step", 10, 0.1, 0.0)
    assert (cfg.data.mean, cfg.data.std) == (POST_MEAN, POST_STD)


def test_seed_code_lr_per_epoch_is_torch_steplr_over_50_epochs():
    """The lr of every epoch of the composed preset, as training steps it (3 steps an epoch stand in for
    the 704 of CIFAR-10 at batch 64), against the post's StepLR(step_size=10, gamma=0.1) over 50 epochs."""
    from torch import nn

    from cbam_train.training.schedule import resolve_stages, stage_scheduler

    cfg = compose_config(["experiment=seed_code", "data.root=/x"])
    [stage] = resolve_stages(cfg.schedule.stages)
    ours, theirs = (torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1e-3) for _ in range(2))
    sched, step_lr = stage_scheduler(ours, stage, 3), torch.optim.lr_scheduler.StepLR(theirs, 10, 0.1)
    mine, post = [], []
    for _epoch in range(stage.epochs):
        mine.append(ours.param_groups[0]["lr"])
        post.append(theirs.param_groups[0]["lr"])
        for _ in range(3):
            assert ours.param_groups[0]["lr"] == mine[-1]  # constant inside an epoch
            ours.step(), sched.step()
        theirs.step(), step_lr.step()
    assert len(mine) == 50 and mine == pytest.approx(post, rel=1e-12, abs=0)  # float64 roundings only
    assert mine[9] == 1e-3 and mine[10] == pytest.approx(1e-4) and mine[49] == pytest.approx(1e-7)


def test_finetune_preset_composes_to_its_documented_choices():
    from cbam_train.training.schedule import resolve_stages

    cfg = compose_config(["experiment=finetune", "data.root=/x"])
    assert cfg.model.pretrained and cfg.model.cbam.init == "identity" and cfg.schedule.freeze_bn
    head, high, full = resolve_stages(cfg.schedule.stages)
    assert {"conv1", "bn1"} <= set(head.trainable) and {"conv1", "bn1"} <= set(high.trainable)
    assert (head.epochs, high.epochs, full.epochs) == (3, 15, 30) and (head.lr, high.lr, full.lr) == (1e-3, 5e-4, 2e-4)
    assert (head.layer_decay, high.layer_decay, full.layer_decay) == (None, 0.7, 0.7)
    assert head.plateau is None and (high.plateau.patience, high.plateau.metric) == (3, "val_acc")
    assert (full.plateau.patience, full.plateau.metric, full.plateau.min_delta) == (5, "val_loss", 0.001)
    assert high.plateau.restore_best and full.plateau.restore_best
    assert (full.sched, full.warmup_epochs, full.min_lr_ratio) == ("cosine", 1.0, 0.01)
    assert cfg.train.grad_clip_norm == 1.0 and cfg.train.label_smoothing == 0.1 and cfg.data.batch_size == 128


def test_fast_presets_compose_to_their_documented_choices():
    fast, short = (compose_config([f"experiment={name}", "data.root=/x"]) for name in ("fast", "fast15"))
    assert (fast.augment.cutout.enabled, fast.augment.cutout.size, fast.augment.crop.padding) == (True, 12, 4)
    assert fast.schedule.stages["all"].epochs == 40 and fast.train.label_smoothing == 0.1
    assert (short.augment.cutout.enabled, short.augment.crop.padding, short.augment.flip.enabled) == (False, 2, True)
    assert short.schedule.stages["all"].epochs == 15 and short.schedule.stages["all"].sched.warmup_epochs == 1
    assert short.train.label_smoothing == 0.2 and short.eval.flip_tta and not short.model.pretrained
    for cfg in (fast, short):
        assert cfg.augment.policy == "none" and cfg.augment.mix.mixup_alpha == cfg.augment.mix.cutmix_alpha == 0
        assert (cfg.optim.name, cfg.data.batch_size, cfg.schedule.stages["all"].lr) == ("sgd", 512, 0.4)


@pytest.mark.parametrize("overrides", [[], ["experiment=fast"], ["experiment=fast15"]],
                         ids=["default", "fast", "fast15"])
def test_other_cifar10_configs_keep_the_measured_std(overrides):
    cfg = compose_config([*overrides, "data.root=/x"])
    assert cfg.data.name == "cifar10" and cfg.data.std == [0.2470, 0.2435, 0.2616]


@pytest.mark.parametrize("preset, extra", [
    ("smoke", []),
    ("seed", ["schedule.stages.head.epochs=1", "schedule.stages.high.epochs=1", "schedule.stages.full.epochs=1"]),
    ("fast", ["schedule.stages.all.epochs=2", "schedule.stages.all.sched.warmup_epochs=1", "lr=0.05",
              "augment.cutout.size=4"]),
    ("fast15", ["schedule.stages.all.epochs=2", "lr=0.05", "augment.policy=trivial", "augment.mix.mixup_alpha=0.8"]),
    ("seed_code", ["schedule.stages.all.epochs=3", "schedule.stages.all.sched.step_size=2"]),
    ("finetune", ["schedule.stages.head.epochs=1", "schedule.stages.high.epochs=1", "schedule.stages.full.epochs=2",
                  "schedule.stages.full.until_plateau.patience=1", "data.batch_size=16"]),
])
@pytest.mark.slow
def test_every_preset_runs_at_smoke_size(tmp_path, narrow_tv_state, preset, extra):
    weights = tmp_path / "tv.pth"
    torch.save(narrow_tv_state, weights)  # experiment=seed asks for ImageNet weights: a local file stands in
    s = run(compose_config([f"experiment={preset}", *SMALL, f"model.weights={weights}", *extra]), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert s["epochs_run"] == len(rows) >= 2 and all(r["train_loss"] == r["train_loss"] for r in rows)
    if preset in ("fast", "fast15"):
        assert rows[0]["lr"] == pytest.approx(0.05) and rows[-1]["lr"] == pytest.approx(0.0, abs=1e-9)
    if preset == "finetune":
        # full: its first epoch is always an improvement, so it runs both; the second decides why it ended
        assert [r["stage_end"] for r in rows][:3] == ["epochs", "epochs", None] and len(rows) == 4
        assert rows[-1]["stage_end"] == ("epochs" if rows[-1]["val_loss"] < rows[-2]["val_loss"] - 0.001 else "plateau")
        assert all(r.get("clipped_steps") is not None for r in rows)  # train.grad_clip_norm is on
    if preset == "seed_code":  # every parameter trains from epoch 1; the lr drops after step_size epochs
        assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3, 1e-4])
        assert s["stages"][0]["trainable_params"] == sum(p.numel() for p in build_model(
            compose_config(["experiment=seed_code", *SMALL, "model.pretrained=false"]).model).parameters())


@pytest.mark.slow
def test_ema_weights_are_evaluated_and_saved(tmp_path):
    from cbam_train.data.datasets import build_splits
    from cbam_train.data.loaders import build_eval_loader
    from cbam_train.models import build_model
    from cbam_train.training.engine import evaluate

    cfg = compose_config(["experiment=smoke", *SMALL, "train.ema_decay=0.5", "eval.flip_tta=true", "stage=head"])
    s = run(cfg, tmp_path / "ema")
    run(compose_config(["experiment=smoke", *SMALL, "stage=head"]), tmp_path / "raw")
    ema_state = torch.load(tmp_path / "ema" / "model.pt", weights_only=True)
    raw_state = torch.load(tmp_path / "raw" / "model.pt", weights_only=True)
    assert s["weights"] == "ema" and list(ema_state) == list(raw_state)
    assert not torch.equal(ema_state["fc.weight"], raw_state["fc.weight"])
    # the saved (EMA) weights, evaluated with flip TTA, give the reported test accuracy
    model = build_model(cfg.model)
    model.load_state_dict(ema_state)
    splits = build_splits(cfg.data, cfg.seed, cfg.model.num_classes)
    loader = build_eval_loader(splits.test, cfg.data, "memory", torch.device("cpu"), splits.mean, splits.std, 0)
    assert evaluate(model, loader, torch.device("cpu"), flip_tta=True)["acc"] == s["test_acc"]
    # task=eval of the run's checkpoint judges the same (EMA) weights, not the raw ones stored beside them
    from cbam_train.tasks.evaluate import run_eval

    out = run_eval(compose_config(["experiment=smoke", *SMALL, "eval.flip_tta=true", "task=eval",
                                   f"checkpoint={tmp_path / 'ema' / 'checkpoints' / 'last.pt'}"]), tmp_path / "ev")
    assert out["weights"] == "ema" and out["accuracy"] == s["test_acc"]


def test_flip_tta_averages_the_logits_of_an_image_and_its_mirror():
    from cbam_train.training.engine import evaluate

    class Left(torch.nn.Module):  # class 1 when the left half is brighter, else 0
        def forward(self, x):
            d = x[..., :4].mean(dim=(1, 2, 3)) - x[..., 4:].mean(dim=(1, 2, 3))
            return torch.stack([-d, d], 1)

    x = torch.zeros(4, 3, 8, 8)
    x[:2, ..., :4] = 1.0
    y = torch.tensor([1, 1, 0, 0])
    plain = evaluate(Left(), [(x, y)], torch.device("cpu"))
    tta = evaluate(Left(), [(x, y)], torch.device("cpu"), flip_tta=True)
    assert plain["acc"] == 1.0 and tta["acc"] == 0.5  # the mirror cancels the cue: logits 0, argmax class 0
