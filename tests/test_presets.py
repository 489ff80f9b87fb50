"""The experiment presets compose to what they promise and run at smoke size; EMA and flip TTA."""

from __future__ import annotations

import json

import pytest
import torch

from cbam_train.train import run
from conftest import compose_config

SMALL = ["data=synthetic", "data.image_size=8", "data.train_size=96", "data.val_size=32", "data.test_size=32",
         "data.batch_size=16", "data.num_classes=10", "device=cpu", "log.mode=quiet"]


def test_seed_preset_is_the_recipe_as_published():
    cfg = compose_config(["experiment=seed", "data.root=/x"])
    assert cfg.model.pretrained and cfg.model.cbam.init == "seed" and cfg.model.cbam.placement == "stage"
    assert cfg.model.stem == "cifar" and not cfg.schedule.freeze_bn
    assert cfg.optim.name == "adam" and cfg.data.batch_size == 64 and cfg.augment.name == "seed"
    assert [(n, s.epochs, s.lr, s.trainable) for n, s in cfg.schedule.stages.items()] == [
        ("head", 5, 1e-3, ["fc", "cbam"]), ("high", 15, 1e-4, ["fc", "cbam", "layer3", "layer4"]),
        ("full", 30, 1e-5, ["all"])]


def test_fast_preset_composes_to_its_documented_choices():
    cfg = compose_config(["experiment=fast", "data.root=/x"])
    assert not cfg.model.pretrained and cfg.model.cbam.init == "identity"
    assert (cfg.optim.name, cfg.optim.nesterov, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", True, 0.9,
                                                                                                5e-4)
    assert cfg.data.batch_size == 512 and cfg.train.label_smoothing == 0.1 and cfg.eval.flip_tta
    [(name, st)] = cfg.schedule.stages.items()
    assert (name, st.epochs, st.lr, st.trainable) == ("all", 40, 0.4, ["all"])
    assert (st.sched.name, st.sched.warmup_epochs) == ("cosine", 2.0)
    assert cfg.augment.name == "flipcrop"


@pytest.mark.parametrize("preset, extra", [
    ("smoke", []),
    ("seed", ["schedule.stages.head.epochs=1", "schedule.stages.high.epochs=1", "schedule.stages.full.epochs=1"]),
    ("fast", ["schedule.stages.all.epochs=2", "schedule.stages.all.sched.warmup_epochs=1", "lr=0.05"]),
])
@pytest.mark.slow
def test_every_preset_runs_at_smoke_size(tmp_path, tv_state, preset, extra):
    weights = tmp_path / "tv.pth"
    torch.save(tv_state, weights)  # experiment=seed asks for ImageNet weights: a local file stands in
    s = run(compose_config([f"experiment={preset}", *SMALL, f"model.weights={weights}", *extra]), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert s["epochs_run"] == len(rows) >= 2 and all(r["train_loss"] == r["train_loss"] for r in rows)
    if preset == "fast":
        assert rows[0]["lr"] == pytest.approx(0.05) and rows[-1]["lr"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
def test_ema_weights_are_evaluated_and_saved(tmp_path):
    from cbam_train.data import build_splits
    from cbam_train.engine import evaluate
    from cbam_train.loaders import build_eval_loader
    from cbam_train.models import build_model

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
    from cbam_train.evaluation import run_eval

    out = run_eval(compose_config(["experiment=smoke", *SMALL, "eval.flip_tta=true", "task=eval",
                                   f"checkpoint={tmp_path / 'ema' / 'checkpoints' / 'last.pt'}"]), tmp_path / "ev")
    assert out["weights"] == "ema" and out["accuracy"] == s["test_acc"]


def test_flip_tta_averages_the_logits_of_an_image_and_its_mirror():
    from cbam_train.engine import evaluate

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
