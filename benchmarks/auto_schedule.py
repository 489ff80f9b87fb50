"""schedule=auto against the post's hand-written schedule and against training everything from the start, side by
side, at the same budget of epochs, on the real CIFAR-10 (JPEG copy) on the CPU (docs/RESULTS.md).

There are no ImageNet weights here, so a first run plays "pretrained": a network without CBAM trained on 5 of the
10 classes, on images the comparison never sees. Each arm then starts from its weights (fc and CBAM new, as with
ImageNet's), trains on the 10 classes and is scored on the same held-out validation split.

    make data && python benchmarks/auto_schedule.py --out /tmp/auto_bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRE_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")


def link_tree(src: Path, dst: Path, classes: list, first: int, count: int) -> None:
    """An ImageFolder of symlinks: images [first, first + count) of each class, in sorted file order."""
    for c in classes:
        (dst / "train" / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / c).iterdir())[first:first + count]:
            link = dst / "train" / c / f.name
            if not link.exists():
                link.symlink_to(f)


def cli(args: list, cwd: Path) -> float:
    """Run cbam-train; its wall time in seconds (start-up included)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cbam_train", *args], cwd=cwd, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT / "data/cifar10-jpeg/train")
    p.add_argument("--out", type=Path, required=True, help="a new folder for the trees and run dirs")
    p.add_argument("--per-class", type=int, default=400, help="images per class in the comparison (val included)")
    p.add_argument("--pre-per-class", type=int, default=1000, help="images per class in the first run")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--pre-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=15, help="the epoch budget of every arm")
    p.add_argument("--seed", type=int, default=0, help="of every run, the first one's included")
    a = p.parse_args()
    out = a.out.resolve()
    classes = sorted(d.name for d in a.data.iterdir() if d.is_dir())
    link_tree(a.data, out / "pre_data", list(PRE_CLASSES), a.per_class, a.pre_per_class)  # disjoint images
    link_tree(a.data, out / "data", classes, 0, a.per_class)
    common = ["data=imagefolder", "device=cpu", f"model.width={a.width}", "data.image_size=32", "data.num_workers=0",
              "log.mode=plain", "log.attention_report=false", "log.show_config=none", f"seed={a.seed}"]
    pretrain = [f"data.root={out / 'pre_data'}", f"data.val_size={min(500, a.pre_per_class)}",
                "model.pretrained=false", "model.cbam.enabled=false", f"model.num_classes={len(PRE_CLASSES)}",
                "schedule=scratch", f"schedule.stages.all.epochs={a.pre_epochs}", "schedule.stages.all.lr=3e-3",
                "schedule.stages.all.sched.warmup_epochs=1", f"hydra.run.dir={out / 'pre'}"]
    times = {"pretrain": cli(common + pretrain, out)}
    fine = common + [f"data.root={out / 'data'}", f"data.val_size={min(1000, a.per_class * 5 // 2)}",
                     f"model.weights={out / 'pre/model.pt'}"]
    b = a.epochs  # the seed schedule's 5:15:30 epochs scaled to the budget
    head, high = max(1, round(b * 5 / 50)), max(1, round(b * 15 / 50))
    arms = {
        "auto": ["schedule=auto", f"schedule.auto.max_epochs={max(1, b // 5)}"],
        "seed": ["schedule=seed", f"schedule.stages.head.epochs={head}", f"schedule.stages.high.epochs={high}",
                 f"schedule.stages.full.epochs={b - head - high}"],
        "all_from_start": ["schedule=seed_code", f"schedule.stages.all.epochs={b}"],
    }
    results = {}
    for name, args in arms.items():
        seconds = cli(fine + args + [f"hydra.run.dir={out / name}"], out)
        s = json.loads((out / name / "summary.json").read_text())
        results[name] = {"best_val_acc": s["best_val_acc"], "final_val_acc": s["final_val_acc"],
                         "epochs_run": s["epochs_run"], "wall_time_s": round(seconds, 1),
                         "stages": [{k: st[k] for k in ("name", "lr", "epochs_run", "ended")} for st in s["stages"]],
                         "overrides": args}
    (out / "auto_schedule.json").write_text(json.dumps({"pretrain_s": round(times["pretrain"], 1),
                                                        "arms": results}, indent=2))
    print("| arm | best val acc | final val acc | epochs run | wall time (s) |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {100 * r['best_val_acc']:.2f}% | {100 * r['final_val_acc']:.2f}% | {r['epochs_run']} | "
              f"{r['wall_time_s']} |")


if __name__ == "__main__":
    main()
