"""The staged run in-process on tiny generated data: reproducibility, weights, warnings, outputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import NARROW, PICTURES_OFF, compose_config

from cbam_train.config.errors import TrainingError, WeightsError
from cbam_train.training.train import run

TINY = ["experiment=smoke", NARROW, "data.image_size=8", "data.train_size=96", "data.val_size=32",
        "data.test_size=32", "data.batch_size=16", "log.mode=plain", *PICTURES_OFF]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_times(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("epoch_time_s", "train_images_per_s")}


@pytest.mark.slow
def test_same_seed_same_results_bit_for_bit(tmp_path):
    a = run(compose_config(TINY), tmp_path / "a")
    b = run(compose_config(TINY), tmp_path / "b")
    assert [without_times(r) for r in rows(tmp_path / "a")] == [without_times(r) for r in rows(tmp_path / "b")]
    sa, sb = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["best_val_acc"] == b["best_val_acc"] and a["test_acc"] == b["test_acc"]
    run(compose_config(TINY + ["seed=1"]), tmp_path / "c")
    sc = torch.load(tmp_path / "c" / "model.pt", weights_only=True)
    assert not torch.equal(sa["fc.weight"], sc["fc.weight"])


@pytest.mark.slow
def test_frozen_modules_do_not_change_during_a_stage(tmp_path):
    """Stage 'high' alone, from a saved start: conv1..layer2 (and their BN statistics) stay bit-identical."""
    cfg = compose_config(TINY + ["stage=high"])
    run(compose_config(TINY + ["stage=head"]), tmp_path / "start")
    start = torch.load(tmp_path / "start" / "model.pt", weights_only=True)
    run(compose_config(TINY + ["stage=high", f"init_from={tmp_path / 'start' / 'model.pt'}"]), tmp_path / "two")
    end = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    frozen = [k for k in start if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")]
    trained = [k for k in start if k.split(".")[0] in ("layer3", "layer4", "fc", "cbam") and "num_batches" not in k]
    assert frozen and all(torch.equal(start[k], end[k]) for k in frozen)  # incl. running_mean/var
    assert any(not torch.equal(start[k], end[k]) for k in trained)
    assert cfg.schedule.stages["high"].trainable == ["fc", "cbam", "layer3", "layer4"]


@pytest.mark.slow
def test_pretrained_weights_file_reports_new_modules_and_warns(tmp_path, capsys, narrow_tv_state):
    weights = tmp_path / "tv.pth"
    torch.save(narrow_tv_state, weights)  # torchvision's layout (7x7 conv1, 1000-way fc, no CBAM), 8 wide as TINY
    cfg = compose_config(TINY + [f"model.weights={weights}", "schedule.stages.head.trainable=[fc,cbam]"])
    run(cfg, tmp_path / "run")
    out, err = capsys.readouterr()
    assert "newly initialised: conv1, fc, cbam" in out
    warning = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1  # once, not per stage
    assert "head: conv1" in warning[0] and "high: conv1" in warning[0]
    assert "schedule.stages.head.trainable=[fc,cbam,conv1,bn1]" in warning[0]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "warning: stages keep newly initialised" in log


@pytest.mark.slow
def test_no_warning_when_the_first_stage_trains_the_new_modules(tmp_path, capsys, narrow_tv_state):
    weights = tmp_path / "tv.pth"
    torch.save(narrow_tv_state, weights)
    run(compose_config(TINY + [f"model.weights={weights}", "schedule.stages.head.trainable=[conv1,bn1,fc,cbam]"]),
        tmp_path / "run")
    assert "warning:" not in capsys.readouterr().err


@pytest.mark.slow
def test_init_from_a_different_architecture_is_refused(tmp_path):
    run(compose_config(TINY + ["stage=head"]), tmp_path / "a")
    with pytest.raises(WeightsError, match="fc.weight"):
        run(compose_config(TINY + ["model.num_classes=5", "data.num_classes=5", "stage=high",
                                   f"init_from={tmp_path / 'a' / 'model.pt'}"]), tmp_path / "b")
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 1 \(head\)"):
        run(compose_config(TINY + ["lr=1e30", "log.every_n_steps=1"]), tmp_path / "run")


@pytest.mark.slow
def test_rich_and_quiet_modes_run(tmp_path, capsys):
    run(compose_config(TINY + ["log.mode=quiet", "stage=1"]), tmp_path / "q")
    out, err = capsys.readouterr()
    assert "epoch" not in out and "best val acc" in err  # quiet: only the summary, on stderr
    assert "epoch   1 [head]" in (tmp_path / "q" / "train.log").read_text()
    run(compose_config(TINY + ["log.mode=rich", "stage=1"]), tmp_path / "r")
    assert "best val acc" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("precision, scaler", [("bf16", False), ("fp16", True), ("fp32", False)])
def test_precision_paths_run_on_cpu(tmp_path, precision, scaler):
    from cbam_train.training.device import resolve_amp

    cfg = compose_config(TINY + [f"device.precision={precision}", "device.channels_last=true", "stage=full"])
    amp = resolve_amp(cfg.device, torch.device("cpu"))
    assert amp.name == precision and (amp.scaler is not None) == scaler
    assert amp.memory_format == torch.channels_last
    s = run(cfg, tmp_path / "run")
    assert s["precision"] == precision
    row = rows(tmp_path / "run")[0]
    assert row["train_loss"] == row["train_loss"] and 0 <= row["val_acc"] <= 1  # finite, sane
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(v.is_contiguous() for v in state.values())  # saved contiguous, loads anywhere
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert (ck["scaler"] is not None) == scaler  # the GradScaler's state goes into checkpoints for a resume
    if scaler:
        assert ck["scaler"]["scale"] > 0 and "_growth_tracker" in ck["scaler"]


def test_auto_precision_is_fp32_on_cpu():
    from cbam_train.training.device import resolve_amp

    amp = resolve_amp(compose_config(["device=auto"]).device, torch.device("cpu"))
    assert amp.name == "fp32" and amp.dtype is None and amp.memory_format == torch.contiguous_format


@pytest.mark.slow
def test_compiled_model_recompiled_at_a_stage_boundary_trains_newly_unfrozen_layers():
    """pytorch#139476: requires_grad changes between stages; after the recompile the unfrozen conv1 must learn."""
    from cbam_train.config.schema import DeviceConfig
    from cbam_train.models import ResNetCBAM
    from cbam_train.training.device import compile_for_stage
    from cbam_train.training.engine import EpochSetup, train_one_epoch
    from cbam_train.training.schedule import apply_stage

    torch.manual_seed(0)
    model = ResNetCBAM(width=8)  # what is compiled and recompiled does not depend on the width
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2)]
    cfg = DeviceConfig(compile=True, compile_backend="aot_eager")
    quiet = lambda *a, **k: None  # noqa: E731
    opt = torch.optim.SGD(apply_stage(model, ["fc", "cbam"]), lr=0.1)
    train_one_epoch(compile_for_stage(model, cfg), batches, opt,
                    EpochSetup(torch.device("cpu"), on_step=quiet, every_n_steps=1, where="head"))
    assert model.conv1.weight.grad is None
    before = model.conv1.weight.detach().clone()
    opt = torch.optim.SGD(apply_stage(model, ["all"]), lr=0.1)
    grads = []  # the optimizer step clears .grad afterwards, so catch the gradients as they arrive
    model.conv1.weight.register_hook(lambda g: grads.append(g.abs().sum().item()))
    train_one_epoch(compile_for_stage(model, cfg), batches, opt,
                    EpochSetup(torch.device("cpu"), on_step=quiet, every_n_steps=1, where="full"))
    assert len(grads) == 2 and min(grads) > 0
    assert not torch.equal(before, model.conv1.weight)


@pytest.mark.parametrize("precision, dtype",
                         [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_forward_runs_under_the_configured_autocast(precision, dtype):
    from cbam_train.models import ResNetCBAM
    from cbam_train.training.device import setup_device
    from cbam_train.training.engine import forward_loss

    model = ResNetCBAM()
    amp = setup_device(model, compose_config(["device=cpu", f"device.precision={precision}",
                                              "device.channels_last=true"]).device, torch.device("cpu"))
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    logits, loss = forward_loss(model, torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), amp)
    assert logits.dtype == dtype and loss.dtype == torch.float32  # cross_entropy autocasts to fp32
