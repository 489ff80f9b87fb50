"""validate(): every check the schema's types cannot express, run once at start-up before anything is read
or written. Each refusal is one ConfigError naming the key, what it got and what is allowed.

Every key is checked whether or not its feature is on (a cutout size while cutout is off, a plateau metric while
the stage's plateau is off, SGD's Nesterov setting under Adam, a class count only synthetic data reads): a bad
value must not wait for the day someone switches the feature on, in a long run's later stage or a sweep.
Conditional are only the checks of a key against another key's value where the first is used: a cutout size
or crop padding against data.image_size (cutout's default 12 must not refuse 8-pixel images while cutout is
off), predict.top_k's upper bound (task=predict), the number of attention rows (task=explain or the report).

Checks that need the data (val_size against the images on disk, batch size against the training split, the
class count of an image folder) run where the data is first read (data.build_splits, loaders.build_loaders),
still before the first step."""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from typing import Any, Iterator

from cbam_train.config.checks import choice, in_range, positive
from cbam_train.config.errors import ConfigError
from cbam_train.config.schedule_checks import check_schedule
from cbam_train.config.schema import (
    EXPORT_FORMATS,
    RESNET18_WIDTH,
    SHOW_CONFIG,
    SUMMARY_METRICS,
    AugmentConfig,
    Config,
    DataConfig,
    LrFindConfig,
    ModelConfig,
)
from cbam_train.config.tasks import TASKS

MAX_SEED = 2**63 - 1  # torch takes up to 2^64 - 1; the margin leaves room for the per-rank and per-split offsets
MIN_IMAGE_SIZE = {"cifar": 8, "imagenet": 32}  # the stem's total stride: below it layer4's 1x1 map is mostly padding
MAX_THREADS = 1024  # torch's CPU threads per process: past any machine's cores
MAX_WIDTH = 1024  # 16x ResNet18's channels: ~2.8 G parameters, past one GPU's memory with Adam state
POLICIES = ("none", "trivial", "autoaugment")  # augment.policy


def _floats(node: Any, prefix: str = "") -> Iterator[tuple]:
    """(key, value) for every float in the config (dataclass fields, dict entries, list items), recursively."""
    if is_dataclass(node):
        items = [(f.name, getattr(node, f.name)) for f in fields(node)]
    elif isinstance(node, dict):
        items = list(node.items())
    else:
        items = [(f"[{i}]", v) for i, v in enumerate(node)]
    for name, value in items:
        key = f"{prefix}{name}" if name.startswith("[") or not prefix else f"{prefix}.{name}"
        if isinstance(value, float):
            yield key, value
        elif is_dataclass(value) or isinstance(value, (dict, list, tuple)):
            yield from _floats(value, key)


def refuse_non_finite_floats(cfg: Config) -> None:
    """NaN and +-inf are refused for every float key: each one means a finite number. Without this a NaN
    passes every range check (`nan <= 0` is false) and crashes deep inside torch."""
    for key, value in _floats(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")


def validate(cfg: Config) -> Config:
    """Check what the types cannot (choices, ranges, lengths, finiteness); raise ConfigError naming the key."""
    refuse_non_finite_floats(cfg)
    _check_task(cfg)
    _check_model(cfg.model)
    _check_pretrained(cfg)
    _check_data(cfg.data, cfg.model, needs_root=cfg.task != "predict")  # predict reads inputs=, not the data
    _check_augment(cfg.augment, cfg.data.image_size)
    check_schedule(cfg)
    _check_optim(cfg)
    _check_device(cfg)
    _check_run(cfg)
    _check_lr_find(cfg.lr_find)
    _check_inference(cfg)
    return cfg


def _check_task(cfg: Config) -> None:
    choice("task", cfg.task, TASKS)
    if cfg.task == "eval" and not cfg.checkpoint:
        raise ConfigError("task=eval needs checkpoint=PATH (a run's model.pt or a checkpoints/*.pt file)")
    if cfg.task in ("predict", "export", "explain") and not cfg.checkpoint:
        raise ConfigError(f"task={cfg.task} needs checkpoint=PATH (a run's model.pt or a checkpoints/*.pt file)")
    if cfg.task == "predict" and not cfg.inputs:
        raise ConfigError("task=predict needs inputs=PATH (an image file, a folder or a glob such as 'imgs/*.jpg')")
    if cfg.resume and cfg.task != "train":
        raise ConfigError(f"resume= only applies to task=train, not task={cfg.task}")
    choice("optimized_metric", cfg.optimized_metric, SUMMARY_METRICS)
    if cfg.lr is not None:
        positive("lr", cfg.lr)
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"seed must be >= 0 and <= {MAX_SEED}, got {cfg.seed}")


def _check_model(m: ModelConfig) -> None:
    choice("model.name", m.name, ("resnet18_cbam",))
    choice("model.stem", m.stem, ("cifar", "imagenet"))
    choice("model.cbam.placement", m.cbam.placement, ("stage", "block"))
    choice("model.cbam.init", m.cbam.init, ("identity", "seed"))
    if m.num_classes < 2:
        raise ConfigError(f"model.num_classes must be >= 2 (a classifier needs at least 2 classes), got "
                          f"{m.num_classes}")
    positive("model.cbam.reduction", m.cbam.reduction)
    if not 1 <= m.width <= MAX_WIDTH:
        raise ConfigError(f"model.width must be in [1, {MAX_WIDTH}] (channels of conv1 and layer1; 64 is ResNet18), "
                          f"got {m.width}")
    if m.cbam.kernel_size < 1 or m.cbam.kernel_size % 2 == 0:
        raise ConfigError(f"model.cbam.kernel_size must be a positive odd number, got {m.cbam.kernel_size}")


def _check_pretrained(cfg: Config) -> None:
    """ImageNet's ResNet18 exists at one width; refused where it would be loaded (a training run or lr_find that
    takes no other weights: init_from, resume and model.weights supply their own)."""
    m = cfg.model
    loads_imagenet = (m.pretrained and not m.weights and not cfg.init_from and not cfg.resume
                      and cfg.task in ("train", "lr_find"))
    if loads_imagenet and m.width != RESNET18_WIDTH:
        raise ConfigError(f"model.pretrained=true needs model.width={RESNET18_WIDTH} (the ImageNet ResNet18 is "
                          f"{RESNET18_WIDTH} wide), got model.width={m.width}; set model.pretrained=false")


def _check_data(d: DataConfig, m: ModelConfig, needs_root: bool = True) -> None:
    choice("data.name", d.name, ("cifar10", "imagefolder", "synthetic"))
    for key in ("batch_size", "eval_batch_size", "image_size", "train_size", "test_size"):
        positive(f"data.{key}", getattr(d, key))
    if d.num_classes < 2:  # read by data=synthetic only, checked for any data
        raise ConfigError(f"data.num_classes must be >= 2 (a classifier needs at least 2 classes), got "
                          f"{d.num_classes}")
    least = MIN_IMAGE_SIZE[m.stem]
    if d.image_size < least:
        raise ConfigError(f"data.image_size must be >= {least} with model.stem={m.stem} (the stem's total "
                          f"stride: smaller images reach layer4 as mostly padding), got {d.image_size}")
    positive("data.val_size", d.val_size, strict=False)
    choice("data.bad_images", d.bad_images, ("error", "skip"))
    choice("data.loader", d.loader, ("auto", "memory", "torchvision"))
    positive("data.memory_budget_mb", d.memory_budget_mb, strict=False)
    positive("data.augment_chunk", d.augment_chunk)
    positive("data.num_workers", d.num_workers, strict=False)
    if d.limit is not None:
        positive("data.limit", d.limit)
    for key in ("mean", "std"):
        v = getattr(d, key)
        if v is not None and len(v) != 3:
            raise ConfigError(f"data.{key} needs 3 values (R, G, B), got {list(v)}")
    if d.mean is not None and not all(0.0 <= x <= 1.0 for x in d.mean):
        raise ConfigError(f"data.mean values must be in [0, 1] (pixels are scaled to [0, 1]), got {list(d.mean)}")
    if d.std is not None and not all(0.0 < x <= 1.0 for x in d.std):
        raise ConfigError(f"data.std values must be in (0, 1] (pixels are scaled to [0, 1]), got {list(d.std)}")
    if d.name == "cifar10" and d.image_size != 32:
        raise ConfigError(f"data.image_size={d.image_size}: CIFAR-10 images are 32x32; use data.image_size=32")
    if d.name in ("cifar10", "imagefolder") and not d.root and needs_root:
        raise ConfigError(f"data.root is required for data={d.name}; pass data.root=PATH")


def _check_augment(a: AugmentConfig, image_size: int) -> None:
    """augment.*: pads, probabilities, strengths, the policy's name, erasing and mixing."""
    positive("augment.crop.padding", a.crop.padding, strict=False)
    if a.crop.enabled and a.crop.padding >= image_size:  # against another key: only when used (see the top)
        raise ConfigError(f"augment.crop.padding must be < data.image_size ({image_size}): a larger pad gives "
                          f"crops of padding only, got {a.crop.padding}")
    in_range("augment.flip.p", a.flip.p, 0.0, 1.0)
    for key in ("brightness", "contrast", "saturation"):
        positive(f"augment.color_jitter.{key}", getattr(a.color_jitter, key), strict=False)
    in_range("augment.color_jitter.hue", a.color_jitter.hue, 0.0, 0.5)
    in_range("augment.rotation.degrees", a.rotation.degrees, 0.0, 180.0)
    choice("augment.policy", a.policy, POLICIES)
    _check_erase(a, image_size)


def _pair(key: str, v: list, low: float, high: float) -> None:
    if len(v) != 2 or not low < v[0] <= v[1] <= high:
        raise ConfigError(f"{key} needs 2 values [low, high] with {low:g} < low <= high <= {high:g}, got {list(v)}")


def _check_erase(a: AugmentConfig, image_size: int) -> None:
    """augment.erase, augment.cutout and augment.mix."""
    in_range("augment.erase.p", a.erase.p, 0.0, 1.0)
    _pair("augment.erase.scale", a.erase.scale, 0.0, 1.0)
    _pair("augment.erase.ratio", a.erase.ratio, 0.0, math.inf)
    positive("augment.cutout.size", a.cutout.size)
    if a.cutout.enabled and a.cutout.size > image_size:  # against another key: only when used (see the top)
        raise ConfigError(f"augment.cutout.size must be in [1, data.image_size ({image_size})], got {a.cutout.size}")
    in_range("augment.cutout.p", a.cutout.p, 0.0, 1.0)
    for key in ("mixup_alpha", "cutmix_alpha"):
        positive(f"augment.mix.{key}", getattr(a.mix, key), strict=False)
    in_range("augment.mix.prob", a.mix.prob, 0.0, 1.0)
    in_range("augment.mix.switch_prob", a.mix.switch_prob, 0.0, 1.0)


def _check_optim(cfg: Config) -> None:
    o = cfg.optim
    choice("optim.name", o.name, ("adam", "sgd"))
    positive("optim.weight_decay", o.weight_decay, strict=False)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas needs 2 values in [0, 1), got {list(o.betas)}")
    positive("optim.eps", o.eps)
    in_range("optim.momentum", o.momentum, 0.0, 1.0, open_high=True)
    if o.nesterov and o.momentum <= 0:  # under Adam too: it waits for optim=sgd
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0")


def _check_device(cfg: Config) -> None:
    dev = cfg.device.name
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"device.name: unknown value {dev!r}; choose one of: auto, cpu, cuda, cuda:N")
    choice("device.precision", cfg.device.precision, ("auto", "bf16", "fp16", "fp32"))
    choice("device.compile_mode", cfg.device.compile_mode, ("default", "reduce-overhead", "max-autotune"))
    choice("device.compile_backend", cfg.device.compile_backend, ("inductor", "aot_eager", "eager"))
    threads = cfg.device.threads
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"device.threads must be in [1, {MAX_THREADS}] or null (the CPU share), got {threads}")


def _check_run(cfg: Config) -> None:
    """train.*, eval.*, logging and the benchmark."""
    t = cfg.train
    choice("train.nan_policy", t.nan_policy, ("stop", "skip_batch"))
    positive("train.checkpoint_every_n_epochs", t.checkpoint_every_n_epochs, strict=False)
    positive("train.checkpoint_every_n_steps", t.checkpoint_every_n_steps, strict=False)
    in_range("train.label_smoothing", t.label_smoothing, 0.0, 1.0, open_high=True)
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in (0, 1) (e.g. 0.999) or null, got {t.ema_decay}")
    if t.grad_clip_norm is not None:
        positive("train.grad_clip_norm", t.grad_clip_norm)
    if t.accumulate_steps < 1:
        raise ConfigError(f"train.accumulate_steps must be >= 1, got {t.accumulate_steps}")
    if t.accumulate_steps > 1 and t.checkpoint_every_n_steps % t.accumulate_steps:
        raise ConfigError(f"train.checkpoint_every_n_steps={t.checkpoint_every_n_steps} must be a multiple of "
                          f"train.accumulate_steps={t.accumulate_steps}: mid-epoch checkpoints fall between "
                          "optimizer steps")
    if t.accumulate_steps > 1 and t.nan_policy == "skip_batch":
        raise ConfigError("train.nan_policy=skip_batch does not combine with train.accumulate_steps > 1 (a skipped "
                          "batch would leave its optimizer step short); use nan_policy=stop")
    choice("eval.split", cfg.eval.split, ("test", "val"))
    for key in ("tracking_uri", "experiment"):
        value = getattr(cfg.logger, key)
        if value is not None and (not value.strip() or "\n" in value):
            raise ConfigError(f"logger.{key}: {value!r} is empty or has a line break; give a name, or null")
    choice("log.mode", cfg.log.mode, ("auto", "rich", "plain", "quiet"))
    positive("log.every_n_steps", cfg.log.every_n_steps)
    choice("log.show_config", cfg.log.show_config, SHOW_CONFIG)
    if cfg.log.curves_every_s is not None:
        positive("log.curves_every_s", cfg.log.curves_every_s, strict=False)
    positive("bench.seconds", cfg.bench.seconds)
    positive("bench.max_steps", cfg.bench.max_steps)
    positive("bench.warmup_steps", cfg.bench.warmup_steps, strict=False)


MAX_EXPLAIN_PER_CLASS = 16
MAX_EXPLAIN_IMAGES = 160  # rows of attention.png: 160 rows at 1.45 in is a tall but readable picture
MIN_LR_FIND_STEPS = 10  # fewer points leave no curve to read a slope from


def _check_lr_find(f: LrFindConfig) -> None:
    """lr_find.*: a sweep that goes up (0 < min_lr < max_lr), long enough to have a slope, a stop above the best."""
    positive("lr_find.min_lr", f.min_lr)
    if f.max_lr <= f.min_lr:
        raise ConfigError(f"lr_find.max_lr must be > lr_find.min_lr ({f.min_lr:g}), got {f.max_lr:g}")
    if f.steps < MIN_LR_FIND_STEPS:
        raise ConfigError(f"lr_find.steps must be >= {MIN_LR_FIND_STEPS}, got {f.steps}")
    in_range("lr_find.smooth", f.smooth, 0.0, 1.0, open_high=True)
    if f.diverge_factor <= 1:
        raise ConfigError(f"lr_find.diverge_factor must be > 1 (a multiple of the best smoothed loss), "
                          f"got {f.diverge_factor:g}")


def _check_inference(cfg: Config) -> None:
    """predict.* and export.*: checked whatever the task, like every other group."""
    p, e = cfg.predict, cfg.export
    # the upper bound only where it is used: a 2-class training run must not trip over the default of 3
    if p.top_k < 1 or (cfg.task == "predict" and p.top_k > cfg.model.num_classes):
        raise ConfigError(f"predict.top_k must be >= 1 and <= the number of classes ({cfg.model.num_classes}), "
                          f"got {p.top_k}; set predict.top_k={min(max(p.top_k, 1), cfg.model.num_classes)}")
    positive("predict.batch_size", p.batch_size)
    choice("export.format", e.format, EXPORT_FORMATS)
    if e.opset < 18:
        raise ConfigError(f"export.opset must be >= 18 (torch's torch.export-based ONNX exporter), got {e.opset}")
    positive("export.check_images", e.check_images)
    x = cfg.explain
    choice("explain.split", x.split, ("val", "test"))
    if not 1 <= x.per_class <= MAX_EXPLAIN_PER_CLASS:
        raise ConfigError(f"explain.per_class must be >= 1 and <= {MAX_EXPLAIN_PER_CLASS} (one picture row per "
                          f"image), got {x.per_class}")
    rows = x.per_class * cfg.model.num_classes
    if rows > MAX_EXPLAIN_IMAGES and (cfg.task == "explain" or cfg.log.attention_report):
        raise ConfigError(f"explain.per_class={x.per_class} x {cfg.model.num_classes} classes = {rows} images, more "
                          f"than attention.png's {MAX_EXPLAIN_IMAGES} rows; set explain.per_class="
                          f"{max(1, MAX_EXPLAIN_IMAGES // cfg.model.num_classes)}"
                          + ("" if cfg.task == "explain" else " or log.attention_report=false"))
