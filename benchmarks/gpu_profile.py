"""torch.profiler over N training steps of the composed config's last stage; top kernels by device time.

    python benchmarks/gpu_profile.py OUT_PREFIX [cbam-train overrides...]

Writes OUT_PREFIX.txt (the key_averages table, sorted by device time, then by CPU time) and OUT_PREFIX.json
(steps, step time, the top ops). Random batches of the configured shape on the device: this times the step
(forward, backward, optimizer), not the input pipeline, which `task=bench` measures on its own.
Used by benchmarks/gpu_proof.sh (step `profile`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from cbam_train.cli.command import find_conf_dir, register_configs
from cbam_train.config.validation import validate
from cbam_train.models import build_model
from cbam_train.training.device import compile_for_stage, resolve_device, setup_device
from cbam_train.training.engine import backward_step, forward_loss
from cbam_train.training.optim import build_optimizer
from cbam_train.training.schedule import apply_stage, param_groups, resolve_stages


def main(prefix: Path, overrides: list) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(find_conf_dir()), version_base="1.3"):
        cfg = validate(OmegaConf.to_object(compose(config_name="config", overrides=overrides)))
    steps, warmup = int(os.environ.get("PROFILE_STEPS", "20")), int(os.environ.get("PROFILE_WARMUP", "5"))
    device = resolve_device(cfg.device.name)
    model = build_model(cfg.model)
    amp = setup_device(model, cfg.device, device)
    stage = resolve_stages(cfg.schedule.stages, cfg.stage, cfg.lr)[-1]  # the last stage: the most work per step
    apply_stage(model, stage.trainable, cfg.schedule.freeze_bn)
    step_model = compile_for_stage(model, cfg.device) if cfg.device.compile else model
    opt = build_optimizer(param_groups(model, stage), cfg.optim, stage.lr)
    bs, size = cfg.data.batch_size, cfg.data.image_size
    x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=amp.memory_format)
    y = torch.randint(0, cfg.model.num_classes, (bs,), device=device)
    step_model.train()

    def step() -> None:
        backward_step(forward_loss(step_model, x, y, amp)[1], opt, amp)

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines = [f"{steps} steps, batch {bs}, {size}x{size}, {amp.name}, compile={cfg.device.compile} "
             f"({cfg.device.compile_mode}), stage {stage.name}: {1000 * wall / steps:.2f} ms/step "
             f"(under the profiler), {steps * bs / wall:,.0f} images/s", "",
             f"sorted by {by}:", events.table(sort_by=by, row_limit=30), "",
             "sorted by self_cpu_time_total:", events.table(sort_by="self_cpu_time_total", row_limit=15)]
    prefix.with_suffix(".txt").write_text("\n".join(lines) + "\n")

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)

    top = sorted(events, key=device_us if device.type == "cuda" else (lambda e: e.self_cpu_time_total),
                 reverse=True)[:20]
    prefix.with_suffix(".json").write_text(json.dumps({
        "steps": steps, "batch_size": bs, "image_size": size, "precision": amp.name, "device": str(device),
        "compile": cfg.device.compile, "compile_mode": cfg.device.compile_mode, "stage": stage.name,
        "ms_per_step": 1000 * wall / steps, "images_per_s": steps * bs / wall, "sorted_by": by,
        "top": [{"name": e.key, "calls": e.count, "self_device_us": device_us(e),
                 "self_cpu_us": e.self_cpu_time_total} for e in top]}, indent=2))
    print("\n".join(lines[:1] + lines[2:4]))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/gpu_profile.py OUT_PREFIX [cbam-train overrides...]")
    main(Path(sys.argv[1]), sys.argv[2:])
