"""Console and files: rich (or plain/quiet) output mirrored without markup to train.log, metrics.jsonl
(and .csv), curves.png and summary.json in the run dir."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from cbam_train.config.errors import UserError
from cbam_train.config.view import ConfigView, plain_lines, view_rows
from cbam_train.reporting.charts import draw_curves, safe_draw, stage_spans
from cbam_train.state.atomic import write_json_atomic, write_text_atomic


def resolve_mode(mode: str, stream=None) -> str:
    """auto -> rich on a terminal, plain when captured (CI, pipes, files)."""
    stream = stream or sys.stdout
    if mode != "auto":
        return mode
    return "rich" if stream.isatty() and os.environ.get("TERM") != "dumb" else "plain"


def _range_test_cell(row: dict) -> str:
    """The stage table's "range test" column: the picture of the range test that found the stage's lr."""
    found = row.get("lr_found")
    if found:
        return found["picture"]
    return "at its start" if row["lr"] is None else ""


def fmt_lr(lr: Optional[float]) -> str:
    return f"{lr:.2e}" if lr is not None else "range test"  # null: found at the stage's start


class Reporter:
    """Everything the run shows or writes about itself; one instance per run."""

    def __init__(self, run_dir: Path, mode: str = "auto", curves_every_s: Optional[float] = None,
                 write: bool = True, tensorboard: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        """curves_every_s: redraw curves.png after an epoch when this many seconds passed since the last
        drawing (0: every epoch; None: never); the first epoch and the end are always drawn. write=False (the
        other ranks of a data-parallel run): no files at all. clock: seconds from any origin (injectable)."""
        self.run_dir = Path(run_dir)
        self.mode = resolve_mode(mode)
        plain = self.mode != "rich"
        # markup=False everywhere: messages contain [brackets] (stage names, override lists) that must print as-is
        self.console = Console(highlight=False, markup=False, no_color=plain, force_terminal=False if plain else None,
                               width=120 if plain else None, soft_wrap=plain, quiet=self.mode == "quiet")
        self.err = Console(stderr=True, highlight=False, markup=False, no_color=plain, soft_wrap=True, quiet=not write)
        self.write = write
        self._log_file = open(self.run_dir / "train.log" if write else os.devnull, "a", encoding="utf-8")
        self.log = Console(file=self._log_file, no_color=True, force_terminal=False, width=120,
                           highlight=False, markup=False, soft_wrap=True)
        self.rows: list = []  # metrics rows so far (all of them, after a resume)
        self._tb = None
        self._tb_class = check_tensorboard() if tensorboard and write else None
        self.tracker: Any = None  # tracking.MlflowTracker (logger=mlflow; rank 0): gets every row and the artifacts
        self.curves_every_s, self._clock, self._drawn_rows = curves_every_s, clock, -1
        # _drawn_at: the clock when curves.png was last drawn, None before the first drawing (time.monotonic()
        # counts from boot, so a number here would throttle the first epoch on a machine up for < curves_every_s)
        self._drawn_at: Optional[float] = None
        self._stages: list = []
        self._test_acc: Optional[float] = None  # marked on curves.png once the run has one

    def close(self, status: str = "FINISHED") -> None:
        """Draw curves.png, hand the files to the tracker (its run ends with `status`: FINISHED | KILLED | FAILED)."""
        self.draw_curves(force=True)  # however the run ended, the picture shows every finished epoch
        if self._tb is not None:
            self._tb.close()
        if self.tracker is not None:
            self.tracker.finish(self.run_dir, status)
        self._log_file.close()

    @contextmanager
    def closed_after(self) -> Iterator["Reporter"]:
        """A task's body: a UserError it raises goes into train.log as well (the console gets it from the CLI);
        the reporter closes however the body ends."""
        try:
            yield self
        except UserError as e:
            self.log_only(f"error: {e}")
            raise
        finally:
            self.close()

    # -- text
    def print(self, *objs: Any, quiet_too: bool = False) -> None:
        """To the console (unless quiet) and the log file."""
        self.log.print(*objs)
        if quiet_too and self.mode == "quiet":
            self.err.print(*objs)
        else:
            self.console.print(*objs)

    def log_only(self, text: str) -> None:
        """To the log file only (e.g. the error the CLI prints to the console itself)."""
        self.log.print(text)

    def warn(self, msg: str) -> None:
        """A yellow line on stderr (even in quiet mode) and in the log."""
        self.log.print(f"warning: {msg}")
        self.err.print(f"warning: {msg}", style="yellow")

    def config(self, yaml_text: str, view: Optional[ConfigView] = None, show: str = "full") -> None:
        """The config at the start of a run (log.show_config): the compact view when given one, else the whole
        tree; nothing for 'none'. train.log gets what the console shows."""
        if show == "none":
            return
        if show == "compact" and view is not None:
            self._config_view(view)
            return
        self.log.print(yaml_text)
        if self.mode == "rich":
            self.console.print(Panel(Syntax(yaml_text, "yaml", background_color="default"), title="config",
                                     expand=False))
        else:
            self.console.print(yaml_text)

    def _config_view(self, view: ConfigView) -> None:
        if view.warning:
            self.warn(view.warning)
        self.log.print("\n".join(plain_lines(view)))
        if self.mode != "rich":
            self.console.print("\n".join(plain_lines(view)))
            return
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for label, text in view_rows(view):
            grid.add_row(label, text)
        self.console.print(Panel(grid, title="config", title_align="left", expand=False))

    def stage_table(self, rows: list) -> None:
        self._stages = stage_spans(rows)
        t = Table(title="schedule")
        grouped = any(len(r.get("lr_groups", ())) > 1 for r in rows)  # lr_mult / layer_decay in some stage
        tested = any(r["lr"] is None or r.get("lr_found") for r in rows)  # schedule=auto: lrs from range tests
        cols = ("#", "stage", "epochs", "global epochs", "lr") + (("range test",) if tested else ()) + (
            "trainable", "trainable params") + (("lr per group",) if grouped else ())
        pictures = max((len(_range_test_cell(r)) for r in rows), default=0) if tested else 0
        for col in cols:  # a picture's path is never cut: the trainable lists wrap instead
            t.add_column(col, justify="right" if col in ("#", "epochs", "lr", "trainable params") else "left",
                         min_width=pictures if col == "range test" else None)
        for r in rows:
            upto = "<=" if r.get("until_plateau") else ""  # a plateau may end the stage sooner
            cells = [str(r["index"]), r["name"], f"{upto}{r['epochs']}", f"{r['first_epoch']}-{upto}{r['last_epoch']}",
                     fmt_lr(r["lr"])] + ([_range_test_cell(r)] if tested else []) + [
                     ", ".join(r["trainable"]), f"{r['trainable_params']:,}"]
            if grouped:  # a stage with one group: its lr is the lr column's
                cells.append("\n".join(f"{fmt_lr(g['lr'])} {', '.join(g['modules'])}" for g in r["lr_groups"])
                             if len(r["lr_groups"]) > 1 else "")
            t.add_row(*cells)
        self.print(t)

    def update_stages(self, rows: list) -> None:
        """The schedule as it now stands (a stage's lr found at its start): curves.png's bands and lr line."""
        self._stages = stage_spans(rows)

    def banner(self, text: str) -> None:
        self.log.rule(text)
        self.console.rule(Text(text, style="bold cyan") if self.mode == "rich" else text)

    # -- per batch
    @contextmanager
    def progress(self, total: int, desc: str) -> Iterator:
        """Yields update(step, stats=None): rich advances a bar (and shows stats when given); plain and the log
        print a line whenever stats are given (the loop passes them every log.every_n_steps)."""
        if self.mode == "rich":
            cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[stats]}")]
            with Progress(*cols, console=self.console, transient=True) as bar:
                task = bar.add_task(desc, total=total, stats="")

                def update(step: int, stats: Optional[dict] = None) -> None:
                    fields: dict[str, Any] = {"stats": _stats_text(stats)} if stats else {}
                    bar.update(task, completed=step, **fields)
                    if stats:
                        self.log.print(f"{desc} step {step}/{total} {_stats_text(stats)}")

                yield update
            return

        def print_update(step: int, stats: Optional[dict] = None) -> None:
            if stats:
                line = f"{desc} step {step}/{total} {_stats_text(stats)}"
                self.log.print(line)
                self.console.print(line)

        yield print_update

    # -- per epoch
    def restore_metrics(self, rows: list) -> None:
        """metrics.jsonl/.csv as of a checkpoint: exactly `rows` (later rows of a killed run are dropped)."""
        self.rows = list(rows)
        if not self.write:
            return
        write_text_atomic(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        write_text_atomic(self.run_dir / "metrics.csv", csv_text(rows))
        if self.tracker is not None:  # a branched or newly tracked run gets the history; a continued one has it
            self.tracker.log_rows(rows, only_new=True)

    def epoch(self, row: dict) -> None:
        """Append one epoch's row to metrics.jsonl and metrics.csv, print it, redraw the curves when due."""
        self.rows.append(row)
        if not self.write:
            return
        if self._tb is None and self._tb_class is not None:
            # after a resume, events of epochs past the checkpoint are dropped like their metrics rows
            self._tb = self._tb_class(str(self.run_dir / "tensorboard"), purge_step=row["epoch"])
        if self._tb is not None:
            for key in ("train_loss", "val_loss", "train_acc", "val_acc", "lr", "train_images_per_s"):
                if row.get(key) is not None:
                    self._tb.add_scalar(key.replace("_", "/", 1), row[key], row["epoch"])
            self._tb.flush()
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        csv_path = self.run_dir / "metrics.csv"
        new = not csv_path.exists() or csv_path.stat().st_size == 0
        with open(csv_path, "a", encoding="utf-8", newline="") as f:
            f.write(csv_text([row], header=new))
        if self.tracker is not None:
            self.tracker.log_rows([row])
        text = (f"epoch {row['epoch']:>3} [{row['stage_name']}] train loss {row['train_loss']:.4f} "
                f"acc {100 * row['train_acc']:5.2f}% | val loss {_num(row['val_loss'], '.4f')} "
                f"acc {_pct(row['val_acc'])} | lr {fmt_lr(row['lr'])} | {row['epoch_time_s']:.1f} s | "
                f"{row['train_images_per_s']:.0f} img/s")
        self.log.print(text)
        self.console.print(text)
        self.draw_curves()

    def draw_curves(self, force: bool = False) -> None:
        """curves.png from the rows so far, when due (see curves_every_s) or forced; a failure only warns."""
        if self.curves_every_s is None or not self.rows or len(self.rows) == self._drawn_rows:
            return
        if not force and self._drawn_at is not None and self._clock() - self._drawn_at < self.curves_every_s:
            return
        self._drawn_rows = len(self.rows)
        path = self.run_dir / "curves.png"
        if not safe_draw(lambda: draw_curves(self.rows, self._stages, path, str(self.run_dir), self._test_acc),
                         path, self.warn):
            self.curves_every_s = None  # warned once; do not retry every epoch
        self._drawn_at = self._clock()

    def summary(self, s: dict) -> None:
        write_json_atomic(self.run_dir / "summary.json", s)
        if s.get("test_acc") is not None:  # close() redraws curves.png with the final test accuracy marked
            self._test_acc, self._drawn_rows = s["test_acc"], -1
        t = Table(title="summary", show_header=False)
        t.add_column("", style="bold")
        t.add_column("")
        t.add_row("best val acc", _pct(s["best_val_acc"]))
        t.add_row("final val acc", _pct(s["final_val_acc"]))
        t.add_row("test acc", _pct(s["test_acc"]) if s["test_acc"] is not None else "n/a (no test split)")
        t.add_row("epochs", str(s["epochs_run"]))
        t.add_row("wall time", f"{s['wall_time_s']:.1f} s")
        t.add_row("device", s["device"])
        t.add_row("run dir", str(self.run_dir))
        self.print(t, quiet_too=True)


def check_tensorboard() -> type:
    """torch's SummaryWriter; logger=tensorboard needs the tensorboard package: without it, one line
    (the run calls this at start-up, before anything is written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter
    except ImportError:
        raise UserError("logger=tensorboard: the tensorboard package is not installed; pip install tensorboard "
                        "(or cbam-train[tensorboard]), or drop logger=tensorboard (metrics.csv and curves.png "
                        "are always written)") from None


def csv_text(rows: list, header: bool = True, columns: Optional[tuple] = None) -> str:
    """rows as CSV (columns: the first row's keys unless given; None as an empty cell)."""
    if not rows and columns is None:
        return ""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns or rows[0]), lineterminator="\n")
    if header:
        w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _num(v: Optional[float], spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:5.2f}%"


def _stats_text(s: dict) -> str:
    return f"loss {s['loss']:.4f} acc {100 * s['acc']:5.2f}% {s['img_per_s']:.0f} img/s"
