"""torchvision's per-image PIL DataLoader vs cbam-train's in-memory batched pipeline, side by side, per preset.

For each augmentation preset (default: seed flipcrop fast trivial autoaugment erase), both sides produce
augmented, normalised float batches with the same ops and parameters from the same real JPEG images, in one
process on the same machine:

    python benchmarks/compare_pipelines.py --root data/cifar10-jpeg [--batch 64] [--seconds 20] [--presets seed trivial]

The torchvision side is torchvision.datasets.ImageFolder + transforms (v1, PIL) + DataLoader(num_workers=0),
decoding each JPEG per sample as the recipe does (one process; PIL work is single-threaded): crop, flip, the
policy (T.TrivialAugmentWide / T.AutoAugment(CIFAR10)), jitter, rotation on PIL, then ToTensor, Normalize and
T.RandomErasing (cutout: RandomErasing with p=1, a fixed 12x12 square). The tool side is the loader
`cbam-train` builds: the split decoded once (cached in <root>/.cbam-cache, the cost reported separately), then
MemoryLoader + BatchAugment, whose tensor ops use torch's intra-op threads (all cores by default: both sides
get the same machine, as a user would run them). Mixing (augment.mix) runs per batch in the training loop, not
in either loader, and is not timed here.
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


ROOT = Path(__file__).resolve().parent.parent
PRESETS = {  # name: (conf/augment/<file>.yaml, extra keys): fast is experiment=fast's augmentation
    "seed": ("seed", {}), "flipcrop": ("flipcrop", {}), "fast": ("flipcrop", {"cutout": {"enabled": True, "size": 12}}),
    "trivial": ("trivial", {}), "autoaugment": ("autoaugment", {}),
    "erase": ("flipcrop", {"erase": {"enabled": True, "p": 0.5}}),
}


def augment_config(name: str):
    """The preset's AugmentConfig, read from the same YAML files the CLI composes."""
    from omegaconf import OmegaConf

    from cbam_train.config.schema import AugmentConfig

    conf = ROOT / "conf" if (ROOT / "conf").is_dir() else ROOT / "cbam_train" / "conf"  # a checkout, or the wheel
    file, extra = PRESETS[name]
    merged = OmegaConf.merge(OmegaConf.structured(AugmentConfig), OmegaConf.load(conf / "augment" / f"{file}.yaml"),
                             extra)
    return OmegaConf.to_object(merged)


def recipe_loader(root: Path, batch: int, a):
    """torchvision's own per-image pipeline for the ops of AugmentConfig a."""
    from torchvision import datasets
    from torchvision import transforms as T

    ops = []
    if a.crop.enabled:
        ops.append(T.RandomCrop(32, padding=a.crop.padding))
    if a.flip.enabled:
        ops.append(T.RandomHorizontalFlip(a.flip.p))
    if a.policy == "trivial":
        ops.append(T.TrivialAugmentWide())
    elif a.policy == "autoaugment":
        ops.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10))
    cj = a.color_jitter
    if cj.enabled:
        ops.append(T.ColorJitter(cj.brightness, cj.contrast, cj.saturation, cj.hue))
    if a.rotation.enabled:
        ops.append(T.RandomRotation(a.rotation.degrees))
    ops += [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    if a.erase.enabled:
        ops.append(T.RandomErasing(a.erase.p, tuple(a.erase.scale), tuple(a.erase.ratio), a.erase.value))
    if a.cutout.enabled:  # a fixed square: area size^2, aspect 1, always inside the image
        area = a.cutout.size ** 2 / 32 ** 2
        ops.append(T.RandomErasing(a.cutout.p, (area, area), (1.0, 1.0), 0))
    ds = datasets.ImageFolder(str(root / "train"), transform=T.Compose(ops))
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0)


def tool_loader(root: Path, batch: int, device: torch.device, a):
    """The training loader `cbam-train data=imagefolder augment=...` builds (data.loader=memory)."""
    from cbam_train.config.schema import DataConfig
    from cbam_train.data.datasets import build_splits
    from cbam_train.data.loaders import build_loaders

    cfg = DataConfig(name="imagefolder", root=str(root), val_size=0, batch_size=batch, loader="memory",
                     mean=list(CIFAR_MEAN), std=list(CIFAR_STD))
    t0 = time.perf_counter()
    loaders = build_loaders(build_splits(cfg, seed=0, num_classes=10), cfg, a, device, 0, 0)
    return loaders.train, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="data/cifar10-jpeg", help="ImageFolder root holding train/<class>/*.jpg")
    ap.add_argument("--batch", type=int, default=64, help="batch size for both (the recipe's is 64)")
    ap.add_argument("--seconds", type=float, default=20.0, help="timing budget per pipeline, split over --rounds")
    ap.add_argument("--rounds", type=int, default=3, help="alternate the two pipelines this many times")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the numbers to this file")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS),
                    help="augmentation presets to compare (fast: flipcrop + cutout 12; erase: flipcrop + erase p 0.5)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core); 1 avoids "
                    "oversubscription when other processes load the cores")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.root)
    if not (root / "train").is_dir():
        sys.exit(f"error: {root / 'train'} not found; unpack the images first (make data)")
    device = torch.device(args.device)
    result = {"batch": args.batch, "device": str(device), "torch_threads": torch.get_num_threads(),
              "machine": platform.machine(), "torch": torch.__version__, "presets": {}}
    for name in args.presets:
        a = augment_config(name)
        tool, decode_s = tool_loader(root, args.batch, device, a)
        recipe = recipe_loader(root, args.batch, a)
        tool_rates, recipe_rates = [], []
        for _ in range(args.rounds):  # alternate, so that machine load lands on both sides; report medians
            tool_rates.append(rate(tool, args.seconds / args.rounds))
            recipe_rates.append(rate(recipe, args.seconds / args.rounds))
        tool_rate, recipe_rate = statistics.median(tool_rates), statistics.median(recipe_rates)
        result["presets"][name] = {
            "torchvision_pil_dataloader_images_per_s": round(recipe_rate, 1),
            "tool_memory_batched_images_per_s": round(tool_rate, 1), "ratio": round(tool_rate / recipe_rate, 2),
            "rounds": {"torchvision": [round(r, 1) for r in recipe_rates], "tool": [round(r, 1) for r in tool_rates]},
            "tool_one_time_decode_s": round(decode_s, 2), "images": len(tool.labels)}
        print(name, json.dumps(result["presets"][name]), flush=True)
        del tool, recipe
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
