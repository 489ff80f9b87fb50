"""A mid-epoch checkpoint resumes exactly: both loaders, and with every in-stage mechanism whose state the
checkpoint must carry (lr schedules, EMA, per-module lr groups, gradient accumulation and clipping)."""

from __future__ import annotations

import pytest
import torch
from test_resume import TINY, assert_same_run, rows

EXTRAS = ["schedule.stages.high.sched.name=cosine", "schedule.stages.high.sched.warmup_epochs=0.5",
          "train.ema_decay=0.9", "train.label_smoothing=0.1", "eval.flip_tta=true",
          # augmentation drawn per image (policy, erasing) and per batch (mixing, its own generator)
          "augment.policy=trivial", "augment.erase.enabled=true", "augment.mix.mixup_alpha=0.8",
          "augment.mix.cutmix_alpha=1.0"]
TV_AUGMENT = ["augment.policy=autoaugment", "augment.cutout.enabled=true", "augment.cutout.size=4",
              "augment.mix.cutmix_alpha=1.0", "augment.mix.prob=0.7"]


STEP = ["schedule.stages.high.epochs=2", "schedule.stages.high.sched.name=step",
        "schedule.stages.high.sched.step_size=1", "schedule.stages.high.sched.gamma=0.5",
        "schedule.stages.high.sched.warmup_epochs=0.5",
        "+schedule.stages.high.lr_mult={layer3:0.1,layer4.1:0.5}", "schedule.stages.high.layer_decay=0.8"]


ACCUMULATE = ["train.accumulate_steps=2", "train.grad_clip_norm=0.5", "data.train_size=112"]  # 5 batches: 2+2+1


@pytest.mark.parametrize("loader, extra", [("memory", []), ("torchvision", TV_AUGMENT), ("memory", EXTRAS),
                                           ("memory", STEP), ("memory", ACCUMULATE)],
                         ids=["memory", "torchvision+autoaugment+cutout+cutmix", "memory+sched+ema+trivial+mix",
                              "memory+step+lr-groups", "memory+accumulate+clip"])
@pytest.mark.slow
def test_resume_from_a_mid_epoch_checkpoint_is_exact(tmp_path, monkeypatch, loader, extra):
    """Every checkpoint the run writes is kept; resuming from one taken mid-epoch in stage 2 (into a new run
    dir) reproduces the rest of the run exactly, for both kinds of loader, and with an in-stage lr schedule,
    EMA weights and the per-image and per-batch augmentation draws, whose states the checkpoint carries too."""
    import shutil

    from conftest import compose_config

    from cbam_train.training import checkpointer, train

    saved = []
    real_save = checkpointer.save_checkpoint

    def keep_copies(state, folder, names, hint):
        real_save(state, folder, names, hint)
        copy = folder.parent.parent / f"ck{len(saved)}.pt"
        shutil.copyfile(folder / names[0], copy)
        saved.append((state["epoch"], state["step"], copy))

    monkeypatch.setattr(checkpointer, "save_checkpoint", keep_copies)
    args = TINY + [f"data.loader={loader}", "train.checkpoint_every_n_steps=2", *extra]
    train.run(compose_config(args), tmp_path / "full")
    mid = [(e, s, p) for e, s, p in saved if s and e == 1]  # epoch 2 (stage 'high') in progress
    assert mid, saved
    monkeypatch.setattr(checkpointer, "save_checkpoint", real_save)
    train.run(compose_config(args + [f"resume={mid[0][2]}"]), tmp_path / "resumed")
    assert_same_run(tmp_path / "full", tmp_path / "resumed")
    if extra == ACCUMULATE:  # checkpoints fall only between optimizer steps, so none holds half a gradient
        assert {s % 2 for _, s, _ in saved} == {0}
    if extra == STEP:  # a row's lr is its epoch's: stage 'high' (lr 1e-3) is epochs 2-3, one drop between them
        assert [r["lr"] for r in rows(tmp_path / "resumed") if r["stage_name"] == "high"] == [1e-3, 0.5e-3]
        groups = torch.load(mid[0][2], weights_only=True)["optimizer"]["param_groups"]
        assert sorted(g["lr_mult"] for g in groups) == pytest.approx(sorted(
            [1.0, 0.8, 0.8 * 0.5, 0.8 ** 2, 0.8 ** 2 * 0.1, 0.8 ** 3, 0.8 ** 4]))  # the checkpoint holds the groups
