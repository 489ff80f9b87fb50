"""`cbam-train task=eval checkpoint=PATH`: a model.pt or checkpoint on the test (or validation) split;
accuracy, loss, per-class accuracy and the confusion matrix to the console and eval.json."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional, cast

import torch
from rich.table import Table

from cbam_train.config.errors import ConfigError, UserError
from cbam_train.config.schema import Config
from cbam_train.config.tasks import JobInfo
from cbam_train.data.datasets import ImageDataset, build_splits
from cbam_train.data.loaders import build_eval_loader, choose_loader, shutdown_workers
from cbam_train.models import build_model
from cbam_train.reporting.charts import safe_draw
from cbam_train.reporting.pictures import draw_confusion, draw_top_losses
from cbam_train.reporting.reporter import Reporter
from cbam_train.state.atomic import write_json_atomic
from cbam_train.state.run_state import ema_weights, trained_with
from cbam_train.state.rundir import check_run_dir, write_record
from cbam_train.state.weights import load_strict, read_weights
from cbam_train.training.device import available_cpus, resolve_device, setup_device
from cbam_train.training.engine import evaluate

EVAL_FILES = ("eval.json", "confusion.png", "top_losses.png", "train.log")
TOP_LOSSES = 16  # images in top_losses.png, as fastai's plot_top_losses shows by default (k=9) and a 4x4 grid fits


def run_eval(cfg: Config, run_dir: Path, record: Optional[dict] = None, job: Optional[JobInfo] = None) -> dict:
    """Evaluate cfg.checkpoint on cfg.eval.split of cfg.data; write eval.json into run_dir."""
    t0 = time.perf_counter()
    if cfg.checkpoint is None:  # validate() refuses this first; the same message for a caller that did not run it
        raise ConfigError("task=eval needs checkpoint=PATH (a run's model.pt or a checkpoints/*.pt file)")
    run_dir, path = Path(run_dir), Path(cfg.checkpoint)
    device = resolve_device(cfg.device.name)
    state, ckpt = read_weights(path, f"checkpoint={cfg.checkpoint}")
    weights = "model"
    ema = ema_weights(ckpt)
    if ema is not None:  # a run with train.ema_decay judged (and saved) its EMA weights
        state, weights = ema, "ema"
    model = build_model(cfg.model)
    load_strict(model, state, f"checkpoint={cfg.checkpoint}")
    check_run_dir(run_dir, EVAL_FILES)
    write_record(run_dir, record)
    rep = Reporter(run_dir, cfg.log.mode)
    with rep.closed_after():
        data_cfg = cfg.data
        (mean, std), _ = trained_with(path, ckpt)
        if data_cfg.mean is None and data_cfg.std is None and mean and std:
            data_cfg = dataclasses.replace(data_cfg, mean=list(mean), std=list(std))
        splits = build_splits(data_cfg, cfg.seed, cfg.model.num_classes, warn=rep.warn)
        ds = splits.test if cfg.eval.split == "test" else splits.val
        if ds is None or len(ds) == 0:
            raise UserError(f"eval.split={cfg.eval.split}: data={cfg.data.name} has no {cfg.eval.split} split here "
                            f"(an image folder without test/?); use eval.split=val")
        kind = choose_loader(splits, cfg.data.loader, cfg.data.memory_budget_mb)
        loader = build_eval_loader(ds, cfg.data, kind, device, splits.mean, splits.std,
                                   min(cfg.data.num_workers, available_cpus()))
        amp = setup_device(model, cfg.device, device)
        try:
            res = evaluate(model, loader, device, amp, num_classes=len(splits.classes), flip_tta=cfg.eval.flip_tta,
                           per_sample=True)
        finally:
            shutdown_workers(loader)
        confusion = res["confusion"]
        per_class = {c: (row[i] / sum(row) if sum(row) else None)
                     for i, (c, row) in enumerate(zip(splits.classes, confusion, strict=True))}
        out = {"checkpoint": str(path), "split": cfg.eval.split, "data": cfg.data.name, "n": res["n"],
               "accuracy": res["acc"], "loss": res["loss"], "per_class": per_class, "classes": list(splits.classes),
               "confusion": confusion, "weights": weights, "flip_tta": cfg.eval.flip_tta, "device": str(device),
               "precision": amp.name,
               "wall_time_s": round(time.perf_counter() - t0, 3)}
        out["top_losses"] = top_losses(res["samples"], readable_positions(ds), ds, splits.classes)
        write_json_atomic(run_dir / "eval.json", out)
        draw_eval_pictures(out, ds, run_dir, f"{path} | {cfg.eval.split} split | {weights} weights", rep.warn)
        rep.print(eval_tables(out), quiet_too=True)
        rep.print(f"wrote {run_dir / 'eval.json'}, confusion.png and top_losses.png")
        return out


def readable_positions(ds: ImageDataset) -> list:
    """The split positions the eval loader yields, in order (data.bad_images=skip leaves unreadable ones out)."""
    bad = getattr(ds.load, "bad", None) or ()
    return [p for p in range(len(ds)) if int(ds.indices[p]) not in bad]


def top_losses(samples: dict, positions: list, ds: ImageDataset, classes: list, k: int = TOP_LOSSES) -> list:
    """The k highest-loss images: split position, source index, true and predicted class, its probability, loss."""
    order = torch.argsort(samples["loss"], descending=True, stable=True)[:k].tolist()
    targets = ds.targets()
    return [{"position": positions[i], "index": int(ds.indices[positions[i]]),
             "true": classes[int(targets[positions[i]])], "pred": classes[int(samples["pred"][i])],
             "prob": float(samples["prob"][i]), "loss": float(samples["loss"][i])} for i in order]


def draw_eval_pictures(out: dict, ds: ImageDataset, run_dir: Path, title: str, warn) -> None:
    """confusion.png (row-normalised) and top_losses.png, as fastai's ClassificationInterpretation draws them."""
    safe_draw(lambda: draw_confusion(out["confusion"], out["classes"], run_dir / "confusion.png",
                                     f"{title}\nconfusion, row-normalised (%): accuracy {100 * out['accuracy']:.2f}%"),
              run_dir / "confusion.png", warn)
    worst = out["top_losses"]
    # cast: these images were evaluated, so each was readable (the loaders leave unreadable ones out)
    loaded = cast("list[torch.Tensor]", [ds.load(r["index"]) for r in worst])
    images = torch.stack(loaded) if worst else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    titles = [f"{r['true']} -> {r['pred']}\np {r['prob']:.2f} | loss {r['loss']:.2f}" for r in worst]
    safe_draw(lambda: draw_top_losses(images, titles, run_dir / "top_losses.png",
                                      f"{title}\nthe {len(worst)} highest-loss images (true -> predicted)"),
              run_dir / "top_losses.png", warn)


def eval_tables(out: dict) -> Table:
    """Accuracy per class beside the confusion matrix (rows: true class, columns: predicted)."""
    classes = out["classes"]
    t = Table(title=f"{out['split']} split: accuracy {100 * out['accuracy']:.2f}% | loss {out['loss']:.4f} | "
                    f"{out['n']} images")
    t.add_column("true \\ pred")
    t.add_column("acc", justify="right")
    for i in range(len(classes)):
        t.add_column(str(i), justify="right")
    for i, (c, row) in enumerate(zip(classes, out["confusion"], strict=True)):
        acc = out["per_class"][c]
        t.add_row(f"{i} {c}", "n/a" if acc is None else f"{100 * acc:.1f}%", *map(str, row))
    return t
