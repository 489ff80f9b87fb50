"""When a stage ends on a plateau: improvement with min_delta, patience, both metrics' directions."""

from __future__ import annotations

import pytest
from conftest import NARROW, PICTURES_OFF, compose_config

from cbam_train.config.errors import ConfigError
from cbam_train.config.schema import PlateauConfig
from cbam_train.training.plateau import best_so_far, describe, improved, stage_end


def rows_of(metric: str, values: list, first_epoch: int = 6) -> list:
    return [{"epoch": first_epoch + i, metric: v} for i, v in enumerate(values)]


def test_improvement_needs_more_than_min_delta_in_the_metrics_direction():
    acc, loss = PlateauConfig(metric="val_acc", min_delta=0.01), PlateauConfig(metric="val_loss", min_delta=0.01)
    assert improved(0.5, None, acc) and improved(9.0, None, loss)  # the first value always counts
    assert improved(0.52, 0.5, acc) and not improved(0.51, 0.5, acc) and not improved(0.4, 0.5, acc)
    assert improved(0.98, 1.0, loss) and not improved(0.99, 1.0, loss) and not improved(1.2, 1.0, loss)


@pytest.mark.parametrize("values, patience, expected", [
    ([0.50, 0.60, 0.55, 0.58], 2, "plateau"),   # best at the 2nd, then 2 epochs without: ends
    ([0.50, 0.60, 0.55, 0.61], 2, None),        # improved again in time: goes on
    ([0.50, 0.60, 0.55], 2, None),              # one epoch of waiting so far
    ([0.50, 0.50, 0.50], 2, "plateau"),         # equal is not better (min_delta 0: strictly more)
    ([0.5, 0.6, 0.7, 0.8, 0.9], 3, "epochs"),   # still improving at the stage's maximum of 5 epochs
])
def test_stage_end_after_patience_epochs_without_improvement(values, patience, expected):
    assert stage_end(rows_of("val_acc", values), 5, PlateauConfig(patience=patience)) == expected


def test_val_loss_plateau_and_best_epoch_and_its_description():
    plateau = PlateauConfig(patience=3, metric="val_loss", min_delta=0.05)
    rows = rows_of("val_loss", [2.0, 1.5, 1.47, 1.52, 1.46])  # 1.47 and 1.46 are not 0.05 better than 1.5
    assert best_so_far(rows, plateau) == (1.5, 7, 3)
    assert stage_end(rows, 30, plateau) == "plateau"
    assert describe(rows, plateau) == ("val_loss did not improve by more than 0.05 for 3 epoch(s) "
                                       "(best 1.5000 at epoch 7)")
    assert stage_end(rows, 30, None) is None and stage_end(rows, 5, None) == "epochs"  # no plateau: epochs only


@pytest.mark.parametrize("override, message", [
    ("schedule.stages.full.until_plateau.patience=0", r"schedule.stages.full.until_plateau.patience must be >= 1"),
    ("schedule.stages.full.until_plateau.min_delta=-0.1", r"until_plateau.min_delta must be >= 0, got -0.1"),
    ("schedule.stages.full.until_plateau.min_delta=nan", r"until_plateau.min_delta must be a finite number"),
    ("schedule.stages.full.until_plateau.metric=train_loss",
     r"schedule.stages.full.until_plateau.metric: unknown value 'train_loss'; choose one of: val_acc, val_loss"),
])
def test_bad_plateau_keys_are_refused_naming_them(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(["schedule.stages.full.until_plateau={patience: 3}", override, "data.root=/x"])


def test_until_plateau_composes_from_the_command_line():
    cfg = compose_config(["schedule.stages.full.until_plateau={patience: 4, metric: val_loss}", "data.root=/x"])
    plateau = cfg.schedule.stages["full"].until_plateau
    assert (plateau.patience, plateau.metric, plateau.min_delta, plateau.restore_best) == (4, "val_loss", 0.0, True)
    assert compose_config(["data.root=/x"]).schedule.stages["full"].until_plateau.patience is None  # off
    assert compose_config(["data.root=/x", "schedule.stages.full.until_plateau=null"]).schedule.stages[
        "full"].until_plateau is None  # off too
    from cbam_train.training.schedule import resolve_stages

    on = compose_config(["data.root=/x", "schedule.stages.high.until_plateau.patience=2"]).schedule.stages
    assert [s.plateau.patience if s.plateau else None for s in resolve_stages(on)] == [None, 2, None]


# --- in a run ------------------------------------------------------------------------------------------------
# head: 1 epoch. high: at most 5, ends on a val_loss plateau after 1 + 2 epochs (no val_loss can beat the best by
# 100). full: at most 4, early-stopped after 1 + 1 epochs (no val_acc can beat the best by 1.0). So the epochs
# that run are 1 | 2 3 4 | 5 6, not the planned 1 | 2-6 | 7-10, whatever the training does.
PLATEAUS = ["experiment=smoke", NARROW, "data.image_size=8", "data.train_size=96", "data.val_size=32",
            "data.test_size=32", "data.batch_size=16", "log.mode=plain", "log.every_n_steps=1",
            "schedule.stages.high.epochs=5",
            "schedule.stages.high.until_plateau={patience: 2, metric: val_loss, min_delta: 100}",
            "schedule.stages.full.epochs=4", "schedule.stages.full.until_plateau={patience: 1, min_delta: 1.0}",
            *PICTURES_OFF]


def metrics(run_dir) -> list:
    import json

    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_stages_end_on_their_plateaus_and_restore_their_best_weights(tmp_path, monkeypatch):
    import json
    import shutil

    import torch

    from cbam_train.training import checkpointer, train

    saved = {}
    real_save = checkpointer.save_checkpoint

    def keep_epoch_ends(state, folder, names, hint):
        real_save(state, folder, names, hint)
        if not state["step"]:
            shutil.copyfile(folder / names[0], tmp_path / f"epoch{state['epoch']}.pt")
            saved[state["epoch"]] = tmp_path / f"epoch{state['epoch']}.pt"

    monkeypatch.setattr(checkpointer, "save_checkpoint", keep_epoch_ends)
    summary = train.run(compose_config(PLATEAUS), tmp_path / "run")
    rows = metrics(tmp_path / "run")
    assert [(r["epoch"], r["stage_name"], r["stage_end"]) for r in rows] == [
        (1, "head", "epochs"), (2, "high", None), (3, "high", None), (4, "high", "plateau"),
        (5, "full", None), (6, "full", "plateau")]
    assert [(s["name"], s["epochs_run"], s["ended"]) for s in summary["stages"]] == [
        ("head", 1, "epochs"), ("high", 3, "plateau"), ("full", 2, "plateau")]
    # restore_best: stage 'high' ended with epoch 2's weights (its best), which stage 'full' then started from;
    # the run ended with epoch 5's (full's best): model.pt and the test accuracy are those weights'
    model = {k: torch.load(saved[e], weights_only=True)["model"] for k, e in (("e2", 2), ("e4", 4), ("e5", 5))}
    assert all(torch.equal(model["e2"][k], model["e4"][k]) for k in model["e2"])  # stage-end checkpoint: restored
    final = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(torch.equal(final[k], model["e5"][k]) for k in final)
    assert (tmp_path / "run" / "checkpoints" / "stage2-high.pt").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs_run"] == 6


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_plateau_wait_resumes_to_the_same_end(tmp_path):
    """SIGKILLed while stage 'high' waits out its patience (epoch 3) and again while the last stage waits
    (epoch 6): the resumed run ends exactly as the uninterrupted one, bit for bit (rows and model.pt)."""
    import signal

    from conftest import call_cli
    from test_resume import assert_same_run, run_until

    ref, run = tmp_path / "ref", tmp_path / "run"
    proc = call_cli(PLATEAUS + [f"hydra.run.dir={ref}"], tmp_path)  # the uninterrupted run, in this process
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rc, out = run_until(PLATEAUS + ["train.checkpoint_every_n_steps=2", f"hydra.run.dir={run}"], tmp_path,
                        "epoch 3 (high) step 3/", wait_for=run / "checkpoints" / "last.pt")
    assert rc == -signal.SIGKILL, out
    rc, out = run_until([f"resume={run}"], tmp_path, "epoch 6 (full) step 3/")
    assert rc == -signal.SIGKILL, out
    rc, out = run_until([f"resume={run}"], tmp_path)
    assert rc == 0, out
    assert "stage 'full' ended at epoch 6" in out
    assert_same_run(ref, run)


def test_curves_bands_follow_the_epochs_that_ran():
    from cbam_train.reporting.charts import actual_spans

    planned = [{"name": "head", "first_epoch": 1, "last_epoch": 1, "epochs": 1, "lr": 1e-3},
               {"name": "high", "first_epoch": 2, "last_epoch": 6, "epochs": 5, "lr": 1e-4},
               {"name": "full", "first_epoch": 7, "last_epoch": 10, "epochs": 4, "lr": 1e-5}]
    rows = [{"epoch": 1, "stage_name": "head", "stage_end": "epochs"}, {"epoch": 2, "stage_name": "high"},
            {"epoch": 3, "stage_name": "high", "stage_end": "plateau"}, {"epoch": 4, "stage_name": "full"}]
    spans = [(s["name"], s["first_epoch"], s["last_epoch"]) for s in actual_spans(planned, rows)]
    assert spans == [("head", 1, 1), ("high", 2, 3), ("full", 4, 7)]  # full still running: its planned length
    assert [(s["first_epoch"], s["last_epoch"]) for s in actual_spans(planned, [])] == [(1, 1), (2, 6), (7, 10)]
