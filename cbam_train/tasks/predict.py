"""`cbam-train task=predict checkpoint=PATH inputs=PATH`: class predictions for image files, read exactly as
training reads an image folder (imagefolder.decode_image), into predictions.csv; unreadable files get a row."""

from __future__ import annotations

import csv
import glob
import io
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from rich.table import Table
from torch import nn

from cbam_train.config.errors import ConfigError, PredictError
from cbam_train.config.schema import Config
from cbam_train.config.tasks import JobInfo
from cbam_train.data.imagefolder import IMAGE_EXTENSIONS, decode_image
from cbam_train.models import build_model
from cbam_train.reporting.reporter import Reporter
from cbam_train.state.atomic import write_text_atomic
from cbam_train.state.run_state import ema_weights, trained_with
from cbam_train.state.rundir import check_run_dir, write_record
from cbam_train.state.weights import load_strict, read_weights
from cbam_train.training.device import resolve_device, setup_device

PREDICT_FILES = ("predictions.csv", "train.log")
SHOWN_ROWS = 10  # rows of predictions.csv printed to the console


@dataclass
class Trained:
    """A checkpoint's model (eval mode, CPU) with what is needed to feed it: classes and normalisation."""

    model: nn.Module
    classes: list
    mean: list
    std: list
    weights: str  # model | ema
    source: Path


def load_trained(cfg: Config, warn: Callable[[str], None] = lambda s: None) -> Trained:
    """cfg.checkpoint's weights (EMA's when the run kept them, as task=eval) in the model cfg.model describes;
    classes and mean/std from the checkpoint or the summary.json beside a model.pt (data.mean/std win)."""
    if cfg.checkpoint is None:  # validate() refuses this first; the same message for a caller that did not run it
        raise ConfigError(f"task={cfg.task} needs checkpoint=PATH (a run's model.pt or a checkpoints/*.pt file)")
    path, what = Path(cfg.checkpoint), f"checkpoint={cfg.checkpoint}"
    state, ckpt = read_weights(path, what)
    ema = ema_weights(ckpt)
    model = build_model(cfg.model)
    load_strict(model, ema if ema is not None else state, what)
    model.eval()
    (saved_mean, saved_std), saved_classes = trained_with(path, ckpt)
    mean, std = cfg.data.mean or saved_mean, cfg.data.std or saved_std
    if not mean or not std:
        raise PredictError(f"{what}: no normalisation found (neither in the file nor in a summary.json beside it); "
                           "pass the training run's data.mean=[R,G,B] data.std=[R,G,B]")
    classes = saved_classes
    if classes is None or len(classes) != cfg.model.num_classes:
        classes = [str(i) for i in range(cfg.model.num_classes)]
        warn(f"{what}: no class names found (neither in the file nor in a summary.json beside it); "
             "classes are named by index")
    return Trained(model, list(classes), list(mean), list(std), "ema" if ema is not None else "model", path)


def find_inputs(spec: str) -> list:
    """The files `inputs=` names, sorted: the file itself, a folder's images (recursive, hidden ones skipped),
    or a glob's matches (`**` recursive)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise PredictError(f"inputs={spec}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return found
    if glob.has_magic(spec):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise PredictError(f"inputs={spec}: the glob matches no file; quote it for the shell, e.g. "
                               "'inputs=imgs/**/*.jpg'")
        return found
    raise PredictError(f"inputs={spec}: no such file or folder")


def predict_batches(trained: Trained, paths: list, image_size: int, device: torch.device, amp, batch_size: int,
                    top_k: int, flip_tta: bool = False) -> list:
    """One row per path, in order: {path, classes (top_k), probs (top_k), error}; images decoded in batches."""
    rows = []
    mean = torch.tensor(trained.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(trained.std, device=device).view(1, 3, 1, 1)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        decoded = [decode_image(p, image_size) for p in chunk]
        good = [i for i, (img, _) in enumerate(decoded) if img is not None]
        top_p = top_i = None
        if good:
            x = torch.stack([decoded[i][0] for i in good]).to(device)
            # the eval loaders' normalisation: uint8 / 255, then (x - mean) / std, per channel
            x = ((x.float() / 255 - mean) / std).contiguous(memory_format=amp.memory_format)
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp.dtype, enabled=amp.dtype is not None):
                logits = trained.model(x).float()
                if flip_tta:
                    logits = (logits + trained.model(x.flip(3)).float()) / 2
            top_p, top_i = logits.softmax(1).topk(top_k, dim=1)
            top_p, top_i = top_p.cpu().tolist(), top_i.cpu().tolist()
        where = {i: j for j, i in enumerate(good)}
        for i, p in enumerate(chunk):
            if i in where:
                assert top_p is not None and top_i is not None  # set above: `good` was not empty
                j = where[i]
                rows.append({"path": str(p), "classes": [trained.classes[c] for c in top_i[j]], "probs": top_p[j],
                             "error": ""})
            else:
                rows.append({"path": str(p), "classes": [], "probs": [], "error": decoded[i][1]})
    return rows


def predictions_csv(rows: list, top_k: int) -> str:
    """path, pred, prob, top1, top1_prob, ..., top<k>, top<k>_prob, error (empty cells for an unreadable file)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "pred", "prob"] + [f"top{i}{s}" for i in range(1, top_k + 1) for s in ("", "_prob")]
                    + ["error"])
    for r in rows:
        tops = [v for c, p in zip(r["classes"], r["probs"], strict=True) for v in (c, f"{p:.6f}")]
        head = [r["classes"][0], f"{r['probs'][0]:.6f}"] if r["classes"] else ["", ""]
        writer.writerow([r["path"], *head, *(tops or [""] * (2 * top_k)), r["error"]])
    return out.getvalue()


def run_predict(cfg: Config, run_dir: Path, record: Optional[dict] = None, job: Optional[JobInfo] = None) -> dict:
    """Predict cfg.inputs with cfg.checkpoint; write predictions.csv into run_dir and print its first rows."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device.name)
    warnings: list = []
    trained = load_trained(cfg, warnings.append)
    if cfg.inputs is None:  # validate() refuses this first; the same message for a caller that did not run it
        raise ConfigError("task=predict needs inputs=PATH (an image file, a folder or a glob such as 'imgs/*.jpg')")
    paths = find_inputs(cfg.inputs)
    check_run_dir(run_dir, PREDICT_FILES)
    write_record(run_dir, record)
    rep = Reporter(run_dir, cfg.log.mode)
    with rep.closed_after():
        for w in warnings:
            rep.warn(w)
        amp = setup_device(trained.model, cfg.device, device)
        t_predict = time.perf_counter()
        rows = predict_batches(trained, paths, cfg.data.image_size, device, amp, cfg.predict.batch_size,
                               cfg.predict.top_k, cfg.eval.flip_tta)
        seconds = time.perf_counter() - t_predict  # decoding and the forward passes, not the start-up
        write_text_atomic(run_dir / "predictions.csv", predictions_csv(rows, cfg.predict.top_k))
        bad = [r for r in rows if r["error"]]
        counts = Counter(r["classes"][0] for r in rows if r["classes"])
        rep.print(rows_table(rows[:SHOWN_ROWS], len(rows)), counts_table(counts, trained.classes), quiet_too=True)
        rep.print(f"predicted {len(rows) - len(bad)} of {len(rows)} image(s) in {seconds:.1f} s "
                  f"({len(rows) / seconds:.1f} img/s, {device}, {amp.name}, {trained.weights} weights; "
                  f"{time.perf_counter() - t0:.1f} s in all); "
                  f"wrote {run_dir / 'predictions.csv'}")
        if bad:
            rep.warn(f"{len(bad)} of {len(rows)} file(s) could not be read, e.g. {bad[0]['path']} "
                     f"({bad[0]['error']}); see the error column of predictions.csv")
        if len(bad) == len(rows):
            raise PredictError(f"inputs={cfg.inputs}: none of the {len(rows)} file(s) could be read, e.g. "
                               f"{bad[0]['path']} ({bad[0]['error']})")
        return {"n": len(rows), "unreadable": len(bad), "counts": dict(counts), "images_per_s": len(rows) / seconds}


def rows_table(rows: list, total: int) -> Table:
    t = Table(title=f"predictions (first {len(rows)} of {total})")
    for col in ("path", "pred", "prob", "top-k", "error"):
        t.add_column(col, justify="right" if col == "prob" else "left")
    for r in rows:
        rest = ", ".join(f"{c} {p:.2f}" for c, p in zip(r["classes"][1:], r["probs"][1:], strict=True))
        t.add_row(r["path"], r["classes"][0] if r["classes"] else "",
                  f"{r['probs'][0]:.3f}" if r["probs"] else "", rest, r["error"])
    return t


def counts_table(counts: Counter, classes: list) -> Table:
    t = Table(title="images per predicted class")
    t.add_column("class")
    t.add_column("images", justify="right")
    for c in sorted(counts, key=lambda c: (-counts[c], classes.index(c))):
        t.add_row(c, str(counts[c]))
    return t
