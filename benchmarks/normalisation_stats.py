"""Per-channel mean and two kinds of std of an image folder: where CIFAR-10's two widely used stds come from.

    python benchmarks/normalisation_stats.py data/cifar10-jpeg/train

'std over all pixels' is the std a Normalize should divide by; 'mean of per-image std' (each image's own std,
averaged) is what the widely copied 0.2023/0.1994/0.2010 is close to.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def main(folder: str) -> None:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        sys.exit(f"error: no .jpg/.jpeg/.png images under {folder}")
    total, total_sq, per_image_std, pixels = np.zeros(3), np.zeros(3), np.zeros(3), 0
    for f in files:  # one image at a time: any sizes, any number of images
        x = np.asarray(Image.open(f).convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255
        total, total_sq, pixels = total + x.sum(0), total_sq + (x * x).sum(0), pixels + len(x)
        per_image_std += x.std(0)
    mean = total / pixels
    print(f"{len(files)} images under {folder}")
    print("mean                  ", mean.round(4))
    print("std over all pixels   ", np.sqrt(total_sq / pixels - mean * mean).round(4))
    print("mean of per-image std ", (per_image_std / len(files)).round(4))

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/normalisation_stats.py IMAGE_FOLDER")
    main(sys.argv[1])
