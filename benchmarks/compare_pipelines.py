"""The recipe's per-image PIL DataLoader vs cbam-train's in-memory batched pipeline, side by side.

Both produce augmented, normalised float batches (crop 32 pad 4, flip, colour jitter 0.2/0.2/0.2/0.1,
rotation 15, normalise) from the same real JPEG images, in one process on the same machine:

    python benchmarks/compare_pipelines.py --root data/cifar10-jpeg [--batch 64] [--seconds 20]

The recipe side is torchvision.datasets.ImageFolder + transforms (v1, PIL) + DataLoader(num_workers=0),
decoding each JPEG per sample as the recipe does (one process; PIL work is single-threaded). The tool
side is the loader `cbam-train` builds: the split decoded once (cached in <root>/.cbam-cache, the cost
reported separately), then MemoryLoader + BatchAugment, whose tensor ops use torch's intra-op threads
(all cores by default: both sides get the same machine, as a user would run them).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def rate(batches, seconds: float, warmup: int = 2) -> float:
    """Images/s pulling batches from an iterator for `seconds` after `warmup` batches."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(batches)
            continue
        n += y.shape[0]
    return n / (time.perf_counter() - t0)


def recipe_loader(root: Path, batch: int):
    from torchvision import datasets, transforms as T

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2, 0.2, 0.1),
                    T.RandomRotation(15), T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0)


def tool_loader(root: Path, batch: int, device: torch.device):
    """The training loader `cbam-train data=imagefolder` builds (data.loader=memory, augment=seed)."""
    from cbam_train.config import AugmentConfig, DataConfig
    from cbam_train.data import build_splits
    from cbam_train.loaders import build_loaders

    cfg = DataConfig(name="imagefolder", root=str(root), val_size=0, batch_size=batch, loader="memory",
                     mean=list(CIFAR_MEAN), std=list(CIFAR_STD))
    t0 = time.perf_counter()
    loaders = build_loaders(build_splits(cfg, seed=0, num_classes=10), cfg, AugmentConfig(), device, 0, 0)
    return loaders.train, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="data/cifar10-jpeg", help="ImageFolder root holding train/<class>/*.jpg")
    ap.add_argument("--batch", type=int, default=64, help="batch size for both (the recipe's is 64)")
    ap.add_argument("--seconds", type=float, default=20.0, help="timing budget per pipeline, split over --rounds")
    ap.add_argument("--rounds", type=int, default=3, help="alternate the two pipelines this many times")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    root = Path(args.root)
    if not (root / "train").is_dir():
        sys.exit(f"error: {root / 'train'} not found; unpack the images first (make data)")
    device = torch.device(args.device)
    tool, decode_s = tool_loader(root, args.batch, device)
    recipe = recipe_loader(root, args.batch)
    tool_rates, recipe_rates = [], []
    for _ in range(args.rounds):  # alternate, so that machine load lands on both sides; report medians
        tool_rates.append(rate(tool, args.seconds / args.rounds))
        recipe_rates.append(rate(recipe, args.seconds / args.rounds))
    tool_rate, recipe_rate = statistics.median(tool_rates), statistics.median(recipe_rates)
    result = {"recipe_pil_dataloader_images_per_s": round(recipe_rate, 1),
              "tool_memory_batched_images_per_s": round(tool_rate, 1), "ratio": round(tool_rate / recipe_rate, 2),
              "rounds": {"recipe": [round(r, 1) for r in recipe_rates], "tool": [round(r, 1) for r in tool_rates]},
              "tool_one_time_decode_s": round(decode_s, 2), "batch": args.batch, "device": str(device),
              "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
              "images": len(tool.labels)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
