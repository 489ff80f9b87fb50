"""Pictures of a run and of a sweep, drawn with matplotlib's headless Agg canvas (no display, no pyplot
state, safe on a cluster node): curves.png per run, sweep.png per sweep, lr_find.png per lr sweep."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

from cbam_train.state.atomic import atomic_write

BAND_COLOURS = ("#dbe9f6", "#fde9d0", "#e2f0d9", "#ece2f0", "#f8e0e0")


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path) -> None:
    """Through the atomic writer (temp file, fsync, rename), so a viewer never opens half a PNG."""
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def draw_curves(rows: list, stages: list, path: Path, title: str = "", test_acc: Optional[float] = None) -> None:
    """Loss and accuracy per epoch (train vs val), each stage a shaded band with its name, lr on a
    secondary log axis, and the final test accuracy (when there is one) as a star after the last epoch.
    `rows`: metrics.jsonl rows so far; `stages`: the planned schedule (name,
    first_epoch, last_epoch, lr, epochs), so a running job already shows the whole schedule (moved up where a
    plateau ended a stage early)."""
    fig = new_figure(11, 4.2)
    ax_loss, ax_acc = fig.subplots(1, 2)
    stages = actual_spans(stages, rows)
    epochs = [r["epoch"] for r in rows]
    last = max([s["last_epoch"] for s in stages] + epochs + [1])
    first = min([s["first_epoch"] for s in stages] + epochs + [1])
    for ax in (ax_loss, ax_acc):
        for i, s in enumerate(stages):
            ax.axvspan(s["first_epoch"] - 0.5, s["last_epoch"] + 0.5, color=BAND_COLOURS[i % len(BAND_COLOURS)],
                       alpha=0.7, lw=0, zorder=0)
            ax.text((s["first_epoch"] + s["last_epoch"]) / 2, 0.98, s["name"], transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=9, color="#444444")
        ax.set_xlim(first - 0.5, last + 0.5)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for key, label, style in (("train", "train", "-o"), ("val", "val", "-s")):
        ax_loss.plot(epochs, [r[f"{key}_loss"] for r in rows], style, ms=3, label=f"{label} loss")
        ax_acc.plot(epochs, [None if r[f"{key}_acc"] is None else 100 * r[f"{key}_acc"] for r in rows], style,
                    ms=3, label=f"{label} acc")
    if test_acc is not None and epochs:
        ax_acc.plot([epochs[-1]], [100 * test_acc], "*", ms=11, color="#c44e52", zorder=5,
                    label=f"test acc {100 * test_acc:.2f}%")
    ax_loss.set_ylabel("loss")
    ax_acc.set_ylabel("accuracy (%)")
    lr_ax = ax_loss.twinx()  # the planned lr per epoch, as steps
    xs = [e for s in stages for e in (s["first_epoch"] - 0.5, s["last_epoch"] + 0.5)]
    ys = [s["lr"] for s in stages for _ in (0, 1)]
    if rows and "lr" in rows[0]:  # a per-step schedule inside stages: show the logged lr per epoch too
        lr_ax.plot(epochs, [r["lr"] for r in rows], ".", ms=3, color="#888888")
    lr_ax.plot(xs, ys, color="#888888", lw=1, ls="--", label="lr")
    lr_ax.set_yscale("log")
    lr_ax.set_ylabel("lr", color="#666666")
    lines = ax_loss.get_legend_handles_labels()
    lr_lines = lr_ax.get_legend_handles_labels()
    ax_loss.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], loc="upper right", fontsize=8)
    ax_acc.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    save_png(fig, path)


def draw_sweep(jobs: list, path: Path, metric: str = "best_val_acc") -> None:
    """Best val accuracy per job: one bar per job labelled with its overrides; failed jobs as red 'failed'."""
    fig = new_figure(max(6.0, 1.2 * len(jobs) + 2), 4.5)
    ax = fig.subplots()
    # 'model.cbam.reduction=8' -> 'reduction=8', Optuna's 'lr=0.0012520653814999472' -> 'lr=0.00125': the full
    # overrides are in sweep_summary.csv
    labels = ["\n".join(_short_key(o) + "=" + short_number(o.split("=", 1)[-1]) for o in j["overrides"])
              or f"job {j['job']}" for j in jobs]
    values = [100 * j[metric] if j.get(metric) is not None else 0.0 for j in jobs]
    colours = ["#4878b0" if j["status"] == "completed" else "#c44e52" for j in jobs]
    bars = ax.bar(range(len(jobs)), values, color=colours)
    for bar, j, v in zip(bars, jobs, values, strict=True):
        text = f"{v:.1f}" if j["status"] == "completed" and j.get(metric) is not None else j["status"]
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8,
                    color="#222222" if j["status"] == "completed" else "#c44e52")
    ax.set_xticks(range(len(jobs)), labels, fontsize=7)
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    ax.grid(axis="y", alpha=0.3)
    save_png(fig, path)


def draw_lr_find(out: dict, path: Path, title: str = "") -> None:
    """Loss against lr (log x) from lr_find.json's fields: each step's loss and the smoothed loss; the suggestion
    as a dashed line with its value and the fitted line whose slope chose it; where the sweep stopped early."""
    import math

    fig = new_figure(7.5, 4.5)
    ax = fig.subplots()
    lrs, stage, s = out["lrs"], out["stage"]["name"], out["suggestion"]
    losses = [math.nan if v is None else v for v in out["losses"]]
    smoothed = [math.nan if v is None else v for v in out["smoothed"]]
    ax.plot(lrs, losses, color="#9bb7d4", lw=0.8, label="loss per step")
    ax.plot(lrs, smoothed, color="#1f4e89", lw=2, label=f"smoothed (EMA {out['settings']['smooth']:g}, bias-corrected)")
    ax.set_xscale("log")
    finite = [v for v in losses + smoothed if math.isfinite(v)]
    # a diverging tail can reach 1e3 and more: keep the descent readable, the tail runs off the top
    top = min(max(finite), 1.5 * max(v for v in smoothed if math.isfinite(v)))
    ax.set_ylim(min(finite) - 0.05 * (top - min(finite)), top)
    ax.axvline(s["lr"], color="#c44e52", ls="--", lw=1.2)
    ax.annotate(f"suggested {s['lr']:.1e}\n({s['method']})", (s["lr"], 0.97), xycoords=("data", "axes fraction"),
                xytext=(4, 0), textcoords="offset points", ha="left", va="top", fontsize=9, color="#c44e52")
    if s["method"] == "steepest_before_min":  # the fitted line whose slope is the steepest
        i, half, fit = s["index"], s["inputs"]["window_steps"] // 2, s["inputs"]
        xs = lrs[max(0, i - half):i + half + 1]
        ax.plot(xs, [fit["level"] + fit["slope_per_decade"] * math.log10(x / lrs[i]) for x in xs], color="#c44e52",
                lw=2.5, alpha=0.8, label=f"steepest fitted slope ({fit['slope_per_decade']:.2f} per decade)")
    if s["method"] == "flat_edge_div_10":  # the flat band the loss stayed in, and the lr where it left it
        fit = s["inputs"]
        ax.axhspan(fit["min_level"], fit["edge_level"], color="#c44e52", alpha=0.12,
                   label=f"flat: fell {fit['fall']:.3f}, under the noise ({fit['level_se']:.3f} per fitted level)")
        ax.axvline(fit["edge_lr"], color="#c44e52", ls=":", lw=1.2, label=f"loss starts to rise: {fit['edge_lr']:.1e}")
    if out["stop"] is not None:
        ax.axvline(out["stop"]["lr"], color="#888888", ls=":", lw=1.2,
                   label=f"stopped early at step {out['stop']['step']} ({out['stop']['reason']})")
    ax.set_xlabel(f"learning rate of stage '{stage}' (log scale)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.35)
    ax.grid(alpha=0.12, which="minor")
    # a flat sweep leaves the bottom right free (the loss there has diverged); "best" ignores the annotation
    ax.legend(loc="lower right" if s["method"] == "flat_edge_div_10" else "best", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    save_png(fig, path)


def _short_key(override: str) -> str:
    return override.split("=", 1)[0].rsplit(".", 1)[-1]


def short_number(value: str) -> str:
    """A float with more than 3 significant digits as 3 (a label, not a record); anything else as given."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.3g}" if "." in value or "e" in value.lower() else value


def stage_spans(stage_rows: list) -> list:
    """The schedule rows a run prints, reduced to what draw_curves needs."""
    return [{"name": r["name"], "first_epoch": r["first_epoch"], "last_epoch": r["last_epoch"],
             "lr": r["lr"] if r["lr"] is not None else math.nan,  # null: not found yet (no lr line there)
             "epochs": r["epochs"]} for r in stage_rows]


def actual_spans(planned: list, rows: list) -> list:
    """The stages' epoch spans as they ran (a plateau ends a stage early, and the later ones move up): a stage
    with rows spans them, to its planned length while it runs; one still to come follows the previous one."""
    out, next_first = [], None
    for s in planned:
        epochs = [r["epoch"] for r in rows if r.get("stage_name") == s["name"]]
        first = min(epochs) if epochs else (next_first if next_first is not None else s["first_epoch"])
        ended = bool(epochs) and any(r.get("stage_end") for r in rows
                                     if r.get("stage_name") == s["name"] and r["epoch"] == max(epochs))
        last = max(epochs) if ended else first + s.get("epochs", s["last_epoch"] - s["first_epoch"] + 1) - 1
        out.append({**s, "first_epoch": first, "last_epoch": last})
        next_first = last + 1
    return out


def safe_draw(draw: Callable[[], None], what: Path, warn: Callable[[str], None]) -> bool:
    """draw(), but never let a plotting problem stop training: warn and return False."""
    try:
        draw()
        return True
    except Exception as e:  # fonts, a full disk, a matplotlib bug: the run's numbers matter more than its pictures
        warn(f"could not draw {what} ({type(e).__name__}: {e}); training goes on without it")
        return False
