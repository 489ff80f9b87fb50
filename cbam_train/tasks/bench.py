"""`cbam-train task=bench`: throughput of each part of a training step with the composed config."""

from __future__ import annotations

import datetime as dt
import itertools
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from rich.table import Table

from cbam_train.config.schema import BenchConfig, Config
from cbam_train.config.tasks import JobInfo
from cbam_train.reporting.reporter import Reporter
from cbam_train.state.atomic import write_json_atomic
from cbam_train.training.device import Amp, setup_device
from cbam_train.training.engine import EpochSetup, backward_step, evaluate, forward_loss, train_one_epoch
from cbam_train.training.session import StageParts, build_stage
from cbam_train.training.startup import prepare_data, start_run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(step: Callable[[], int], device: torch.device, warmup: int, seconds: float, max_steps: int) -> float:
    """Images/s of `step` (returns the images it processed) after `warmup` calls, within a time/step budget."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0, steps, images = time.perf_counter(), 0, 0
    while steps < max_steps and time.perf_counter() - t0 < seconds:
        images += step()
        steps += 1
    _sync(device)
    return images / (time.perf_counter() - t0)


class _Stream:
    """n batches per iteration from an endless source (a function returning the next batch)."""

    def __init__(self, next_batch: Callable, n: int) -> None:
        self.next_batch, self.n = next_batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return (self.next_batch() for _ in range(self.n))


class _Batches:
    """A loader of exactly n batches, cycling through `source` (for timing train_one_epoch)."""

    def __init__(self, source, n: int) -> None:
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.islice(itertools.cycle(self.source), self.n)


def _peak_memory_mb(device: torch.device) -> tuple:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def run_bench(cfg: Config, run_dir: Path, record: Optional[dict] = None, job: Optional[JobInfo] = None) -> dict:
    """Measure augmentation, the input pipeline, training per stage, a bare step loop and evaluation."""
    run_dir = Path(run_dir)
    started = start_run(cfg, run_dir, record, required=("bench.json",))
    try:
        return _bench(cfg, run_dir, started.stages, started.model, started.device, started.rep)
    finally:
        started.rep.close()


def _bench(cfg: Config, run_dir: Path, stages: list, model: torch.nn.Module, device: torch.device,
           rep: Reporter) -> dict:
    b = cfg.bench
    budget: dict[str, Any] = dict(device=device, warmup=b.warmup_steps, seconds=b.seconds, max_steps=b.max_steps)
    splits, loaders = prepare_data(cfg, device, rep)
    amp = setup_device(model, cfg.device, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: dict = {"device": str(device), "device_name": _device_name(device), "precision": amp.name,
                 "channels_last": amp.memory_format == torch.channels_last, "compile": cfg.device.compile,
                 "loader": loaders.kind, "batch_size": cfg.data.batch_size,
                 "eval_batch_size": cfg.data.eval_batch_size, "train_images": len(splits.train),
                 "torch": torch.__version__, "date": dt.date.today().isoformat()}
    out["augment_images_per_s"] = _augment_rate(loaders, cfg.seed, budget)
    batches = _Endless(loaders.train)
    out["loader_images_per_s"] = images_per_s(lambda: batches.load_one(device), **budget)
    ready = _ready_batches(batches, device, cfg.data.batch_size, len(splits.train))
    quiet = EpochSetup(device, amp, where="bench")  # no progress, one host sync per call
    out["train_images_per_s"], out["bare_step_images_per_s"] = {}, {}
    for stage in stages:  # each stage as training opens it: its trainable set, param groups, optimizer, compile
        parts = build_stage(model, stage, cfg)
        timing = _time_stage(parts, ready, amp, quiet, b, budget)
        out["train_images_per_s"][stage.name] = timing.loop
        out["bare_step_images_per_s"][stage.name] = timing.bare
    last = stages[-1].name

    def end_to_end() -> int:  # the last stage's loop fed by the real input pipeline, as in training
        return train_one_epoch(parts.step_model, _Stream(batches.next, timing.per_call), parts.optimizer, quiet).n

    out["train_end_to_end_images_per_s"] = images_per_s(end_to_end, **timing.chunk)
    out["loop_overhead_pct"] = 100 * (out["bare_step_images_per_s"][last] / out["train_images_per_s"][last] - 1)

    eval_ready = [tuple(t.to(device) for t in batch) for batch in itertools.islice(loaders.val, 1)]
    out["eval_images_per_s"] = (images_per_s(lambda: evaluate(model, eval_ready, device, amp)["n"],
                                             **dict(budget, warmup=1)) if eval_ready else None)
    out["peak_memory_mb"], out["peak_memory_kind"] = _peak_memory_mb(device)
    write_json_atomic(run_dir / "bench.json", out)
    _print_table(rep, out)
    return out


def _augment_rate(loaders: Any, seed: int, budget: dict) -> Optional[float]:
    """The batched augmentation alone, on the loader's chunks already on the device (None: no batched loader)."""
    if loaders.augment is None:
        return None
    x = loaders.train.images[:loaders.train.chunk]
    gen = torch.Generator(device=budget["device"]).manual_seed(seed)
    return images_per_s(lambda: loaders.augment(x, gen).shape[0], **budget)


class _Endless:
    """Endless batches from a loader: a new epoch (new order, new augmentation draws) when one ends."""

    def __init__(self, loader: Iterable) -> None:
        self.loader, self.it = loader, iter(loader)

    def next(self) -> tuple:
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def load_one(self, device: torch.device) -> int:
        x, y = self.next()
        x.to(device, non_blocking=True)
        return y.shape[0]


def _ready_batches(batches: _Endless, device: torch.device, batch_size: int, n_train: int) -> list:
    """A fixed set of ready, full batches on the device, so training and the bare loop see identical work of
    one shape (up to 8, from at most two epochs)."""
    per_epoch = len(batches.loader)  # type: ignore[arg-type]
    ready: list = []
    for _ in range(2 * per_epoch):
        x, y = batches.next()
        if y.shape[0] == batch_size or n_train < batch_size:
            ready.append((x.to(device), y.to(device)))
        if len(ready) == min(8, per_epoch):
            break
    return ready


@dataclass
class _StageTiming:
    loop: float  # images/s of the real training loop on the ready batches
    bare: float  # images/s of forward/backward/step alone, the same batches
    per_call: int  # batches per timed call
    chunk: dict  # the budget of one measurement (images_per_s's keywords)


def _time_stage(parts: StageParts, ready: list, amp: Amp, quiet: EpochSetup, b: BenchConfig, budget: dict,
                rounds: int = 3) -> _StageTiming:
    """The stage's training loop against bare steps; `rounds` alternating measurements of each, the best of
    each kept, so that noise lands on neither side."""
    step_model, opt = parts.step_model, parts.optimizer
    per_call = 1  # batches per timed call, set below so that one call takes a fraction of the budget

    def loop_step() -> int:  # the real training loop (device-side sums, one sync per call) on ready batches
        return train_one_epoch(step_model, _Batches(ready, per_call), opt, quiet).n

    def bare_step() -> int:  # forward/backward/step only, the same batches
        n = 0
        step_model.train()
        for x, y in itertools.islice(itertools.cycle(ready), per_call):
            backward_step(forward_loss(step_model, x, y, amp)[1], opt, amp)
            n += y.shape[0]
        return n

    device = budget["device"]
    per_call = len(ready)  # warm up once on every ready batch: allocations, optimizer state, cuDNN, compile
    bare_step()
    per_call = 1
    for _ in range(b.warmup_steps - 1):
        bare_step()
    _sync(device)
    t0 = time.perf_counter()
    bare_step()
    _sync(device)
    step_s = time.perf_counter() - t0
    per_call = max(1, min(b.max_steps, int(b.seconds / rounds / 4 / max(step_s, 1e-6))))
    chunk = dict(budget, seconds=b.seconds / rounds, max_steps=max(1, b.max_steps // per_call), warmup=0)
    loop_rates, bare_rates = [], []
    for _ in range(rounds):
        loop_rates.append(images_per_s(loop_step, **chunk))
        bare_rates.append(images_per_s(bare_step, **chunk))
    return _StageTiming(max(loop_rates), max(bare_rates), per_call, chunk)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _print_table(rep: Reporter, r: dict) -> None:
    t = Table(title=f"bench: {r['device_name']}, {r['precision']}, batch {r['batch_size']}, {r['loader']} loader")
    t.add_column("measure")
    t.add_column("images/s", justify="right")
    fmt = (lambda v: "n/a" if v is None else f"{v:,.0f}")
    t.add_row("augmentation alone", fmt(r["augment_images_per_s"]))
    t.add_row("input pipeline (ready batches on the device)", fmt(r["loader_images_per_s"]))
    for name, v in r["train_images_per_s"].items():
        t.add_row(f"training loop, stage '{name}'", fmt(v))
        t.add_row(f"bare forward/backward/step, stage '{name}'", fmt(r["bare_step_images_per_s"][name]))
    t.add_row(f"training loop fed by the input pipeline, stage '{list(r['train_images_per_s'])[-1]}'",
              fmt(r["train_end_to_end_images_per_s"]))
    t.add_row("evaluation", fmt(r["eval_images_per_s"]))
    t.add_row(f"peak memory ({r['peak_memory_kind']})", f"{r['peak_memory_mb']:,.0f} MB")
    t.add_row("loop overhead vs bare steps", f"{r['loop_overhead_pct']:+.1f}%")
    rep.print(t, quiet_too=True)
