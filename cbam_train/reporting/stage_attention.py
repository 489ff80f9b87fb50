"""log.attention_report: at each stage end, task=explain's pictures of the val split's fixed image set, so a run
shows how attention changes as the stages unfreeze: <run dir>/attention/stage<k>-<name>.png (and -gates.png),
and one row per CBAM module in <run dir>/attention.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from cbam_train.state.atomic import write_text_atomic
from cbam_train.tasks.explain import ImageSet, attention_report, draw_report, pick_images

ROW_KEYS = ("channel_drift", "spatial_drift", "channel_gate_mean", "spatial_gate_mean")


class StageAttention:
    """Draws and records the attention report of one run at its stage ends (rank 0 only)."""

    def __init__(self, run_dir: Path, splits, per_class: int, all_blocks: bool, init: str,
                 warn: Callable[[str], None]) -> None:
        self.run_dir, self.splits, self.per_class = run_dir, splits, per_class
        self.all_blocks, self.init = all_blocks, init
        self.warn = warn
        self._picked: Optional[ImageSet] = None  # chosen at the first stage end: a run may never get there

    def stage_end(self, model: nn.Module, stage, epoch: int, device: torch.device) -> tuple:
        """The report of `model` after `stage` ended at `epoch`: (picture path, seconds it took)."""
        t0 = time.perf_counter()
        if self._picked is None:
            self._picked = pick_images(self.splits.val, self.per_class, len(self.splits.classes))
        summary, drawing = attention_report(model, self._picked, list(self.splits.classes),
                                            (self.splits.mean, self.splits.std), device, self.init, self.all_blocks)
        folder = self.run_dir / "attention"
        folder.mkdir(exist_ok=True)
        stem = f"stage{stage.index}-{stage.name}"
        picture = folder / f"{stem}.png"
        title = f"after stage {stage.index} '{stage.name}' (epoch {epoch}) | val split"
        draw_report(summary, drawing, picture, folder / f"{stem}-gates.png", title, self.warn)
        rows = [{"stage": stage.index, "stage_name": stage.name, "epoch": epoch, "module": m["name"],
                 **{k: m[k] for k in ROW_KEYS},
                 "spatial_concentration": _mean(m["spatial_concentration"].values())}
                for m in summary["modules"]]
        self._record(stage.index, rows)
        return picture, time.perf_counter() - t0

    def _record(self, stage_index: int, rows: list) -> None:
        """attention.jsonl with this stage's rows; rows a stage wrote before (a run resumed past its end) replaced."""
        path = self.run_dir / "attention.jsonl"
        kept = []
        if path.is_file():
            kept = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("stage") != stage_index]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept + rows))


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
