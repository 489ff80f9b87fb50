"""The attention report on a fixed, stratified image set: each CBAM's gates and Grad-CAM as numbers
(attention.json's) and pictures (attention.png, gates.png). task=explain draws it once for a checkpoint;
log.attention_report draws it at each stage end (StageAttention), so a run shows how attention changes as the
stages unfreeze: <run dir>/attention/stage<k>-<name>.png (and -gates.png), one row per CBAM module in
<run dir>/attention.jsonl."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from cbam_train.augment.batched import normalize
from cbam_train.config.errors import UserError
from cbam_train.data.datasets import ImageDataset
from cbam_train.reporting.attention import inspect, stratified_pick, summarise, upsample
from cbam_train.reporting.charts import safe_draw
from cbam_train.reporting.pictures import draw_attention, draw_gates
from cbam_train.state.atomic import write_text_atomic

ROW_KEYS = ("channel_drift", "spatial_drift", "channel_gate_mean", "spatial_gate_mean")


@dataclasses.dataclass
class ImageSet:
    """The images a report looks at: uint8 (N, 3, H, W), their labels (N,) and positions in their split."""

    images: torch.Tensor
    labels: torch.Tensor
    positions: list


def pick_images(ds: ImageDataset, per_class: int, num_classes: int) -> ImageSet:
    """`per_class` images of each class, the first ones in the split's (fixed) order; unreadable ones left out."""
    positions = stratified_pick(ds.targets(), per_class, num_classes)
    kept, images = [], []
    for p in positions:
        img = ds.load(int(ds.indices[p]))
        if img is not None:
            kept.append(p)
            images.append(img)
    if not images:
        raise UserError("explain: the split has no readable images to look at")
    labels = torch.as_tensor([int(ds.targets()[p]) for p in kept])
    return ImageSet(torch.stack(images), labels, kept)


def attention_report(model: nn.Module, picked: ImageSet, classes: list, norm: tuple, device: torch.device,
                     init: str, all_blocks: bool = False) -> tuple:
    """Gates and Grad-CAM of `model` on the picked images: (summary dict for attention.json, drawing inputs).
    norm: (mean, std) the model was trained with. The model's weights and mode are left as they were."""
    x = normalize(picked.images.to(device), *norm)
    att = inspect(model, x, all_blocks)
    summary = summarise(att, picked.labels, classes, init)
    probs = att.probs.cpu()
    pred = att.pred.cpu()
    summary["images"] = [{"position": pos, "true": classes[int(t)], "pred": classes[int(p)],
                          "prob": float(probs[i, p])}
                         for i, (pos, t, p) in enumerate(zip(picked.positions, picked.labels, pred, strict=True))]
    size = tuple(picked.images.shape[-2:])
    drawing = {"images": picked.images.cpu(),
               "titles": [f"{r['true']}\n-> {r['pred']} {r['prob']:.2f}" for r in summary["images"]],
               "spatial": {name: upsample(maps, size).cpu() for name, maps in att.spatial.items()},
               "gradcam": att.gradcam.cpu()}
    return summary, drawing


def draw_report(summary: dict, drawing: dict, attention_png: Path, gates_png: Path, title: str, warn) -> None:
    """attention.png and gates.png of one report; a drawing failure only warns (the numbers are already kept)."""
    safe_draw(lambda: draw_attention(drawing["images"], drawing["titles"], drawing["spatial"], drawing["gradcam"],
                                     attention_png, title), attention_png, warn)
    safe_draw(lambda: draw_gates(summary, gates_png, title), gates_png, warn)



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
