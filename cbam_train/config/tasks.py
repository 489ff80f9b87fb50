"""The tasks `task=` names: one entry each, read by the CLI (what runs, what checkpoint= re-creates) and by
validation (the names it accepts). A new task is one `Task` here and a module with its runner.

Every runner has one signature, `run(cfg, run_dir, record=None, job=None) -> dict`, and is imported only when
its task runs, so that a config error is answered before torch is imported."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

from cbam_train.config.view import ConfigView


@dataclass
class JobInfo:
    """What the CLI knows about this job that the config does not hold (plain values; no Hydra below cli/)."""

    name: str = "cbam-train"  # hydra.job.name: the MLflow experiment unless logger.experiment is set
    overrides: list = field(default_factory=list)  # the job's command-line overrides: in checkpoints, MLflow tags
    num: Optional[int] = None  # the job's number in a sweep (-m); None: a single run
    sweep_dir: Optional[str] = None  # the sweep's root folder (-m)
    view: Optional[ConfigView] = None  # what log.show_config=compact prints (None: the whole config)


@dataclass(frozen=True)
class Task:
    name: str
    runner: str  # "module:function", the function taking (cfg, run_dir, record, job)
    reads_checkpoint: bool  # checkpoint= names its input, and the run's recorded overrides come first
    about: str  # one line: what it does and writes
    shows_config: bool = False  # prints the config at its start (log.show_config): the CLI composes the view

    def load(self) -> Callable:
        """The runner function (its module imported now)."""
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)


TASKS = {task.name: task for task in (
    Task("train", "cbam_train.training.train:run", False,
         "the staged run: checkpoints, metrics, curves.png, model.pt, summary.json", shows_config=True),
    Task("eval", "cbam_train.tasks.evaluate:run_eval", True,
         "a checkpoint on the val or test split (eval.split): eval.json, confusion.png, top_losses.png"),
    Task("bench", "cbam_train.tasks.bench:run_bench", False,
         "throughput of each part of a training step: bench.json"),
    Task("lr_find", "cbam_train.tasks.lr_find:run_lr_find", False,
         "an lr range test over one stage: lr_find.json, lr_find.png"),
    Task("predict", "cbam_train.tasks.predict:run_predict", True,
         "a checkpoint on image files (inputs=): predictions.csv"),
    Task("export", "cbam_train.tasks.export:run_export", True,
         "a checkpoint to ONNX or TorchScript, checked against PyTorch: model.onnx|model.ts, model.json"),
    Task("explain", "cbam_train.tasks.explain:run_explain", True,
         "a checkpoint's attention on a fixed image set (explain.split): attention.png, gates.png, attention.json"),
)}
