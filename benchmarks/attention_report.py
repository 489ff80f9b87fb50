"""What log.attention_report costs a run: one stage-end report (gates and Grad-CAM of 2 val images per class, then
attention.png and gates.png drawn), against one training step of the same model, so the cost can be put in epochs.
On the real CIFAR-10 (JPEG copy) images when --root is given, else on random images of the same size.

    .venv/bin/python benchmarks/attention_report.py --root data/cifar10-jpeg --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cbam_train.data.imagefolder import decode_image
from cbam_train.models import ResNetCBAM
from cbam_train.reporting.explain_report import ImageSet, attention_report, draw_report

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def images(root: Path | None, per_class: int) -> ImageSet:
    """per_class images of each of 10 classes: the first files of each class folder, or random pixels."""
    if root is None:
        g = torch.Generator().manual_seed(0)
        return ImageSet(torch.randint(0, 256, (10 * per_class, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.arange(10).repeat_interleave(per_class), list(range(10 * per_class)))
    folders = sorted(p for p in (root / "train").iterdir() if p.is_dir())
    picked, labels = [], []
    for c, folder in enumerate(folders):
        for f in sorted(folder.iterdir())[:per_class]:
            picked.append(decode_image(f, 32)[0])
            labels.append(c)
    return ImageSet(torch.stack(picked), torch.tensor(labels), list(range(len(picked))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=None, help="an image folder holding train/<class>/")
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="the training step compared with")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = ResNetCBAM(num_classes=10)
    picked = images(args.root, args.per_class)
    classes = [str(i) for i in range(10)]
    report_s, draw_s, step_s = [], [], []
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            summary, drawing = attention_report(model, picked, classes, (CIFAR_MEAN, CIFAR_STD),
                                                torch.device("cpu"), "identity")
            t1 = time.perf_counter()
            draw_report(summary, drawing, Path(tmp) / "a.png", Path(tmp) / "g.png", "bench", print)
            t2 = time.perf_counter()
            report_s.append(t1 - t0)
            draw_s.append(t2 - t1)
            model.train()
            t3 = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            step_s.append(time.perf_counter() - t3)
    gates, draw, step = map(statistics.median, (report_s, draw_s, step_s))
    print(f"images: {len(picked.positions)} ({'random' if args.root is None else args.root}); medians of "
          f"{args.repeats}, {torch.get_num_threads()} threads")
    print(f"gates + Grad-CAM: {gates:.3f} s | drawing attention.png + gates.png: {draw:.3f} s | "
          f"report: {gates + draw:.3f} s")
    print(f"one training step at batch {args.batch}: {step:.3f} s -> the report costs "
          f"{(gates + draw) / step:.1f} steps; an epoch of 45,000 images is {45000 / args.batch:.0f} steps")


if __name__ == "__main__":
    main()
