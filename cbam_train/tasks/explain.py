"""`cbam-train task=explain checkpoint=PATH`: what the attention does on a fixed, stratified set of images.
attention.png (each CBAM module's spatial gate and Grad-CAM over each image), gates.png (channel-gate
histograms and drift) and attention.json (the numbers); the stage-end report of a training run draws the same."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import torch
from rich.table import Table
from torch import nn

from cbam_train.augment.batched import normalize
from cbam_train.config.errors import UserError
from cbam_train.config.schema import Config
from cbam_train.config.tasks import JobInfo
from cbam_train.data.datasets import ImageDataset, build_splits
from cbam_train.reporting.attention import inspect, stratified_pick, summarise, upsample
from cbam_train.reporting.charts import safe_draw
from cbam_train.reporting.pictures import draw_attention, draw_gates
from cbam_train.reporting.reporter import Reporter
from cbam_train.state.atomic import write_json_atomic
from cbam_train.state.rundir import check_run_dir, write_record
from cbam_train.tasks.predict import load_trained
from cbam_train.training.device import resolve_device

EXPLAIN_FILES = ("attention.png", "gates.png", "attention.json", "train.log")


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


def run_explain(cfg: Config, run_dir: Path, record: Optional[dict] = None, job: Optional[JobInfo] = None) -> dict:
    """Explain cfg.checkpoint on cfg.explain.split: attention.png, gates.png, attention.json into run_dir."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device.name)
    warnings: list = []
    trained = load_trained(cfg, warnings.append)
    check_run_dir(run_dir, EXPLAIN_FILES)
    write_record(run_dir, record)
    rep = Reporter(run_dir, cfg.log.mode)
    try:
        for w in warnings:
            rep.warn(w)
        data_cfg = dataclasses.replace(cfg.data, mean=trained.mean, std=trained.std)
        splits = build_splits(data_cfg, cfg.seed, cfg.model.num_classes, warn=rep.warn)
        ds = splits.test if cfg.explain.split == "test" else splits.val
        if ds is None or len(ds) == 0:
            raise UserError(f"explain.split={cfg.explain.split}: data={cfg.data.name} has no {cfg.explain.split} "
                            f"split here; use explain.split={'val' if cfg.explain.split == 'test' else 'test'}")
        picked = pick_images(ds, cfg.explain.per_class, len(trained.classes))
        model = trained.model.to(device)
        summary, drawing = attention_report(model, picked, trained.classes, (trained.mean, trained.std), device,
                                            cfg.model.cbam.init, cfg.explain.all_blocks)
        if not cfg.model.cbam.enabled:
            rep.warn("model.cbam.enabled=false: no attention gates; attention.png shows Grad-CAM only")
        summary.update({"checkpoint": str(trained.source), "split": cfg.explain.split, "weights": trained.weights,
                        "placement": cfg.model.cbam.placement if cfg.model.cbam.enabled else None,
                        "n": len(picked.positions), "wall_time_s": round(time.perf_counter() - t0, 3)})
        write_json_atomic(run_dir / "attention.json", summary)
        title = f"{trained.source} | {cfg.explain.split} split | {trained.weights} weights"
        draw_report(summary, drawing, run_dir / "attention.png", run_dir / "gates.png", title, rep.warn)
        rep.print(drift_table(summary), quiet_too=True)
        rep.print(f"wrote {run_dir / 'attention.png'}, gates.png and attention.json "
                  f"({len(picked.positions)} images, {time.perf_counter() - t0:.1f} s)")
        return summary
    except UserError as e:
        rep.log_only(f"error: {e}")
        raise
    finally:
        rep.close()


def drift_table(summary: dict) -> Table:
    """Per module: drift of the channel and spatial gates, and how concentrated the spatial maps are."""
    t = Table(title=f"CBAM gates ({summary['reference_means']})")
    for col in ("module", "channels", "channel drift", "spatial drift", "spatial concentration"):
        t.add_column(col, justify="left" if col == "module" else "right")
    for m in summary["modules"]:
        conc = [v for v in m["spatial_concentration"].values() if v is not None]
        t.add_row(m["name"], str(m["channels"]), f"{m['channel_drift']:.4f}", f"{m['spatial_drift']:.4f}",
                  f"{sum(conc) / len(conc):.3f}" if conc else "n/a")
    return t
