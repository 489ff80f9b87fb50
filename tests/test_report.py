"""The run's files besides the weights: metrics.jsonl / metrics.csv, curves.png, and their behaviour on resume."""

from __future__ import annotations

import csv
import json

import pytest

from cbam_train.reporting import charts
from cbam_train.reporting.reporter import Reporter

STAGES = [{"index": 1, "name": "head", "epochs": 2, "lr": 1e-3, "trainable": ["fc"], "trainable_params": 10,
           "first_epoch": 1, "last_epoch": 2},
          {"index": 2, "name": "full", "epochs": 2, "lr": 1e-4, "trainable": ["all"], "trainable_params": 99,
           "first_epoch": 3, "last_epoch": 4}]


def row(epoch: int, val_acc=0.5) -> dict:
    return {"epoch": epoch, "stage": 1 + (epoch > 2), "stage_name": "head" if epoch <= 2 else "full",
            "lr": 1e-3 if epoch <= 2 else 1e-4, "train_loss": 2.0 / epoch, "train_acc": 0.1 * epoch,
            "val_loss": 1.5 / epoch, "val_acc": val_acc, "skipped_batches": 0, "epoch_time_s": 1.0,
            "train_images_per_s": 100.0}


def png_size(path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_metrics_jsonl_and_csv_hold_the_same_rows(tmp_path):
    rep = Reporter(tmp_path, "quiet")
    rows = [row(1), row(2, None)]
    for r in rows:
        rep.epoch(r)
    rep.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows
    with open(tmp_path / "metrics.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == list(rows[0])
    assert [float(g["train_loss"]) for g in got] == [r["train_loss"] for r in rows]
    assert got[1]["val_acc"] == ""  # None: an empty cell
    assert not (tmp_path / "curves.png").exists()  # curves_every_s=None: never drawn


def test_restore_metrics_rewrites_both_files(tmp_path):
    rep = Reporter(tmp_path, "quiet")
    for e in (1, 2, 3):
        rep.epoch(row(e))
    rep.restore_metrics([row(1)])
    rep.epoch(row(2, 0.7))
    rep.close()
    assert [json.loads(x)["epoch"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch,") and lines[2].split(",")[7] == "0.7"


class FakeClock:
    """Seconds since boot, advanced by hand: the throttle must not depend on how long the machine is up."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_curves_drawn_every_epoch_when_asked(tmp_path):
    rep = Reporter(tmp_path, "quiet", curves_every_s=0, clock=FakeClock(0.0))
    rep.stage_table(STAGES)
    rep.epoch(row(1))
    assert png_size(tmp_path / "curves.png") == (1100, 420)
    first = (tmp_path / "curves.png").read_bytes()
    rep.epoch(row(2))
    assert (tmp_path / "curves.png").read_bytes() != first  # redrawn with the new epoch
    rep.close()


@pytest.mark.parametrize("uptime_s", [0.0, 5.0, 1e6], ids=["just-booted", "young", "up-for-weeks"])
def test_curves_throttled_after_the_first_epoch_and_drawn_at_the_end_whatever_the_uptime(tmp_path, uptime_s):
    """The first epoch is drawn even when the clock (time.monotonic counts from boot) reads less than
    curves_every_s; a bug once throttled it on machines up for less than that."""
    clock = FakeClock(uptime_s)
    rep = Reporter(tmp_path, "quiet", curves_every_s=20, clock=clock)
    rep.stage_table(STAGES)
    rep.epoch(row(1))  # nothing drawn yet: drawn now
    before = (tmp_path / "curves.png").read_bytes()
    clock.now += 19.9
    rep.epoch(row(2))
    assert (tmp_path / "curves.png").read_bytes() == before  # throttled: 19.9 s < 20 s since the last drawing
    clock.now += 0.2
    rep.epoch(row(3))
    third = (tmp_path / "curves.png").read_bytes()
    assert third != before  # 20.1 s since the last drawing: drawn
    rep.epoch(row(4))
    assert (tmp_path / "curves.png").read_bytes() == third  # throttled again
    rep.close()
    assert (tmp_path / "curves.png").read_bytes() != third  # the end is always drawn


def test_a_failing_plot_warns_once_and_training_goes_on(tmp_path, monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("no fonts")

    monkeypatch.setattr("cbam_train.reporting.reporter.draw_curves", broken)
    rep = Reporter(tmp_path, "quiet", curves_every_s=0)
    rep.stage_table(STAGES)
    rep.epoch(row(1))
    rep.epoch(row(2))
    rep.close()
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "could not draw" in ln]
    assert len(warnings) == 1 and "no fonts" in warnings[0]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_sweep_plot_marks_failed_jobs(tmp_path):
    jobs = [{"job": 0, "overrides": ["lr=1e-3"], "status": "completed", "best_val_acc": 0.8},
            {"job": 1, "overrides": ["lr=1e-2"], "status": "failed", "best_val_acc": None}]
    charts.draw_sweep(jobs, tmp_path / "sweep.png")
    w, h = png_size(tmp_path / "sweep.png")
    assert w >= 600 and h == 450


@pytest.mark.parametrize("n_rows", [0, 1, 4])
def test_curves_draw_for_any_number_of_rows(tmp_path, n_rows):
    charts.draw_curves([row(e) for e in range(1, n_rows + 1)], charts.stage_spans(STAGES), tmp_path / "c.png")
    assert png_size(tmp_path / "c.png") == (1100, 420)
    assert not list(tmp_path.glob(".*.tmp"))


def test_tensorboard_logger_writes_scalars(tmp_path):
    pytest.importorskip("torch.utils.tensorboard", reason="tensorboard is not installed (it is in the dev extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rep = Reporter(tmp_path, "quiet", tensorboard=True)
    for e in (1, 2):
        rep.epoch(row(e, 0.25 * e))
    rep.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(ev.step, ev.value) for ev in acc.Scalars("val/acc")] == [(1, 0.25), (2, 0.5)]
    assert {"train/loss", "val/loss", "train/acc", "lr"} <= set(acc.Tags()["scalars"])


def test_missing_tensorboard_is_one_clear_line(monkeypatch):
    import builtins

    from cbam_train.config.errors import UserError
    from cbam_train.reporting.reporter import check_tensorboard

    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(UserError, match="logger=tensorboard: the tensorboard package is not installed; pip install"):
        check_tensorboard()


def test_sweep_labels_shorten_long_floats_only():
    """Optuna's overrides carry 17 significant digits; three keep the bars' labels apart (sweep.png)."""
    assert charts.short_number("0.0012520653814999472") == "0.00125"
    assert charts.short_number("3.860866271460548e-05") == "3.86e-05"
    assert [charts.short_number(v) for v in ("8", "16", "adam", "[fc,cbam]")] == ["8", "16", "adam", "[fc,cbam]"]


def test_the_final_test_accuracy_is_marked_on_curves_png(tmp_path, monkeypatch):
    """Reporter.summary with a test_acc redraws curves.png at close with the test accuracy passed to the drawing,
    and the drawing then plots one more point than without it (the star after the last epoch)."""
    seen = []
    real = charts.draw_curves
    monkeypatch.setattr("cbam_train.reporting.reporter.draw_curves", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    rep = Reporter(tmp_path, "quiet", curves_every_s=0)
    rep.stage_table(STAGES)
    rep.epoch(row(1))
    rep.summary({"best_val_acc": 0.5, "final_val_acc": 0.5, "test_acc": 0.625, "epochs_run": 1, "wall_time_s": 1.0,
                 "device": "cpu"})
    rep.close()
    assert seen == [None, 0.625]
    lines = []
    monkeypatch.setattr(charts, "save_png", lambda fig, path: lines.append(
        [ln.get_label() for ax in fig.axes for ln in ax.get_lines()]))
    charts.draw_curves([row(1), row(2)], charts.stage_spans(STAGES), tmp_path / "a.png")
    charts.draw_curves([row(1), row(2)], charts.stage_spans(STAGES), tmp_path / "b.png", test_acc=0.625)
    assert [lb for lb in lines[1] if lb not in lines[0]] == ["test acc 62.50%"]
