"""A run that cannot go on, and what it leaves: a non-finite loss (stop, naming the step, or skip the batch), a
full disk while a checkpoint is written (the previous one intact), a second signal (abort at once)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_resume import TINY, rows

from cbam_train.state.weights import CHECKPOINT_FORMAT


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip_batch"])
def test_non_finite_loss(tmp_path, monkeypatch, policy):
    """A NaN loss at epoch 2 step 2: `stop` ends the run naming the step, with epoch 1's checkpoint kept;
    `skip_batch` leaves that batch out of the update and the run finishes."""
    from conftest import compose_config

    from cbam_train.config.errors import TrainingError
    from cbam_train.training import engine
    from cbam_train.training.train import run

    real = engine.forward_loss
    calls = {"n": 0}

    def nan_at_step_6(model, x, y, amp, label_smoothing=0.0):  # 4 batches per epoch: call 6 is epoch 2, step 2
        calls["n"] += 1
        logits, loss = real(model, x, y, amp, label_smoothing)
        return logits, loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(engine, "forward_loss", nan_at_step_6)
    cfg = compose_config(TINY + [f"train.nan_policy={policy}"])
    run_dir = tmp_path / "run"
    if policy == "stop":
        with pytest.raises(TrainingError) as e:
            run(cfg, run_dir)
        assert "non-finite loss at epoch 2 (high) step 2" in str(e.value)
        assert "checkpoints/last.pt (epoch 1) is the last good state" in str(e.value)
        last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
        assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values()
                                          if v.is_floating_point())
        assert not (run_dir / "model.pt").exists()
    else:
        s = run(cfg, run_dir)
        r = rows(run_dir)
        assert [x["skipped_batches"] for x in r] == [0, 1, 0]
        assert all(x["train_loss"] == x["train_loss"] for x in r)  # finite
        assert s["epochs_run"] == 3


@pytest.mark.slow
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC in the middle of writing epoch 2's checkpoint: one clear error (exit 1), epoch 1's last.pt intact
    and loadable, no temp file left."""
    import errno

    from conftest import compose_config

    from cbam_train.config.errors import CheckpointError
    from cbam_train.training.train import run

    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
            calls["n"] += 1
            if calls["n"] == 2:
                f.write(b"\0" * 4096)  # part of the file made it to disk
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as e:
        run(compose_config(TINY), tmp_path / "run")
    msg = str(e.value)
    assert e.value.exit_code == 1 and "No space left on device" in msg and "previous checkpoint is intact" in msg
    assert f"cbam-train resume={tmp_path / 'run'}" in msg
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["best.pt", "last.pt", "stage1-head.pt"]
    assert torch.load(ck / "last.pt", weights_only=True)["epoch"] == 1


def test_second_signal_aborts_at_once():
    from cbam_train.training.interrupt import Interrupted, StopRequest

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when the suite runs in the background
    notes = []
    with StopRequest(notes.append) as stop:
        stop.arm()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and "SIGINT received" in notes[0]
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGINT)
        assert e.value.exit_code == 130 and "aborted at once" in str(e.value)
    assert signal.getsignal(signal.SIGINT) is before  # restored
