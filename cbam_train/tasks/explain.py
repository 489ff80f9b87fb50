"""`cbam-train task=explain checkpoint=PATH`: what the attention does on a fixed, stratified set of images.
attention.png (each CBAM module's spatial gate and Grad-CAM over each image), gates.png (channel-gate
histograms and drift) and attention.json (the numbers); the stage-end report of a training run draws the same."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

from rich.table import Table

from cbam_train.config.errors import UserError
from cbam_train.config.schema import Config
from cbam_train.config.tasks import JobInfo
from cbam_train.data.datasets import build_splits
from cbam_train.reporting.explain_report import attention_report, draw_report, pick_images
from cbam_train.reporting.reporter import Reporter
from cbam_train.state.atomic import write_json_atomic
from cbam_train.state.rundir import check_run_dir, write_record
from cbam_train.tasks.predict import load_trained
from cbam_train.training.device import resolve_device

EXPLAIN_FILES = ("attention.png", "gates.png", "attention.json", "train.log")


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
    with rep.closed_after():
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
