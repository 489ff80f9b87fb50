"""Pictures of what a model learned (matplotlib's headless Agg canvas, as plots.py): attention.png and gates.png
for task=explain and the stage-end attention report, confusion.png and top_losses.png for task=eval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cbam_train.reporting.charts import new_figure, save_png

CELL_IN = 1.45  # inches per image in a grid


def _rgb(image: torch.Tensor) -> np.ndarray:
    """uint8 (3, H, W) -> (H, W, 3) for imshow."""
    return image.permute(1, 2, 0).cpu().numpy()


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _colour_range(maps: torch.Tensor) -> tuple[float, float]:
    """One colour scale per column, so images can be compared; a flat column (an untrained gate) sits mid-scale."""
    lo, hi = float(maps.min()), float(maps.max())
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-6 else (lo, hi)


def draw_attention(images: torch.Tensor, titles: list, spatial: dict, gradcam: torch.Tensor, path: Path,
                   title: str = "") -> None:
    """One row per image: the image, each CBAM module's spatial gate over it (one colour scale per module, its
    range in the header), then Grad-CAM of the predicted class. images: uint8 (B, 3, H, W); spatial: name ->
    (B, H, W) gates upsampled to the image; gradcam: (B, H, W) in [0, 1]; titles: one per row.
    The cells are blended in numpy into one canvas and drawn as one image (one axes per cell took ~9 s for 20 rows)."""
    from matplotlib import colormaps

    # (header, gates or None for the image itself, colour range: the image's pixels are in [0, 1] too)
    columns = [("input", None, (0.0, 1.0))] + [(f"{name} gate", maps, _colour_range(maps))
                                               for name, maps in spatial.items()]
    columns.append(("Grad-CAM", gradcam, (0.0, 1.0)))
    rows, (h, w) = images.shape[0], images.shape[-2:]
    scale = max(1, 96 // max(h, w))  # cells of ~96 px, pixels kept square (nearest)
    gap = 4
    ch, cw = h * scale + gap, w * scale + gap
    canvas = np.ones((rows * ch - gap, len(columns) * cw - gap, 3))
    jet = colormaps["jet"]
    for r in range(rows):
        rgb = images[r].permute(1, 2, 0).cpu().numpy() / 255.0
        for c, (_, maps, rng) in enumerate(columns):
            cell = rgb
            if maps is not None:
                lo, hi = rng
                heat = jet(np.clip((maps[r].cpu().numpy() - lo) / (hi - lo), 0, 1))[..., :3]
                cell = 0.5 * rgb + 0.5 * heat
            cell = cell.repeat(scale, 0).repeat(scale, 1)
            canvas[r * ch:r * ch + h * scale, c * cw:c * cw + w * scale] = cell
    fig = new_figure(CELL_IN * len(columns), CELL_IN * rows + 0.7)
    ax = fig.subplots()
    ax.imshow(canvas, interpolation="nearest", aspect="equal")
    _bare(ax)
    for side in ax.spines.values():
        side.set_visible(False)
    for c, (name, maps, rng) in enumerate(columns):
        header = name if maps is None or name == "Grad-CAM" else f"{name}\n[{rng[0]:.2f}, {rng[1]:.2f}]"
        ax.text(c * cw + (cw - gap) / 2, -6, header, ha="center", va="bottom", fontsize=8)
    for r, label in enumerate(titles):
        ax.text(-6, r * ch + (ch - gap) / 2, label, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    save_png(fig, path)


def draw_gates(summary: dict, path: Path, title: str = "") -> None:
    """Per CBAM module, the histogram of its channel-gate values over the set, the pass-through value 1 marked,
    and the drift (mean |gate - 1|) in its title; the footer says what the reference means for this init."""
    modules = summary["modules"]
    cols = min(4, max(1, len(modules)))
    rows = max(1, -(-len(modules) // cols))
    fig = new_figure(3.1 * cols, 2.5 * rows + 0.6)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, m in zip(axes, modules, strict=False):
        counts = np.asarray(m["channel_hist"]["counts"], dtype=float)
        edges = np.linspace(m["channel_hist"]["min"], m["channel_hist"]["max"], len(counts) + 1)
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0")
        ax.axvline(summary["reference"], color="#c44e52", lw=1, ls="--")
        ax.set_title(f"{m['name']} ({m['channels']} ch): drift {m['channel_drift']:.3f}", fontsize=9)
        ax.set_xlabel("channel gate", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(modules):]:
        ax.set_visible(False)
    if not modules:
        axes[0].set_visible(True)
        _bare(axes[0])
        axes[0].text(0.5, 0.5, "no CBAM modules (model.cbam.enabled=false)", ha="center", va="center")
    fig.suptitle((title + "\n" if title else "") + "drift = mean |gate - 1|; " + summary["reference_means"],
                 fontsize=8, wrap=True)
    save_png(fig, path)


def draw_confusion(confusion: list, classes: list, path: Path, title: str = "") -> None:
    """The confusion matrix normalised per row (true class), with class names; cells annotated up to 20 classes."""
    m = np.asarray(confusion, dtype=float)
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    k = len(classes)
    side = min(14.0, 2.5 + 0.55 * k)
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{100 * rows[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if rows[i, j] > 0.5 else "#333333")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title(title or "confusion (row-normalised, %)", fontsize=9)
    save_png(fig, path)


def draw_top_losses(images: torch.Tensor, titles: list, path: Path, title: str = "") -> None:
    """The highest-loss images in a 4-wide grid, each titled (true / predicted, probability, loss)."""
    n = images.shape[0]
    cols = min(4, max(1, n))
    rows = max(1, -(-n // cols))
    fig = new_figure(CELL_IN * 1.3 * cols, CELL_IN * 1.45 * rows + 0.4)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        _bare(ax)
        ax.set_visible(False)
    for i in range(n):
        axes[i].set_visible(True)
        axes[i].imshow(_rgb(images[i]), interpolation="nearest")
        axes[i].set_title(titles[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    save_png(fig, path)
