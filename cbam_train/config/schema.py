"""The configuration schema: typed dataclasses that Hydra's ConfigStore registers and YAML fills.

Hydra rejects unknown keys and wrong types at composition (struct mode); `validation.validate` adds the
checks a type cannot express (ranges, choices, finiteness) with messages a user can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class CBAMConfig:
    enabled: bool = True
    placement: str = "stage"  # stage: after layer1..layer4 (the recipe); block: inside every BasicBlock
    reduction: int = 16  # channel-MLP bottleneck: C -> C // reduction -> C
    kernel_size: int = 7  # spatial-attention conv, odd
    init: str = "identity"  # identity: CBAM(x) == x at init; seed: the recipe's plain sigmoid gates


RESNET18_WIDTH = 64  # conv1's and layer1's channels in ResNet18; the only width pretrained files exist at


@dataclass
class ModelConfig:
    name: str = "resnet18_cbam"
    num_classes: int = 10
    pretrained: bool = True  # torchvision ResNet18_Weights.IMAGENET1K_V1 via TORCH_HOME
    weights: Optional[str] = None  # a state-dict file; overrides `pretrained`
    stem: str = "cifar"  # cifar: 3x3 stride-1 conv1, no max-pool; imagenet: torchvision's 7x7/2 + pool
    width: int = RESNET18_WIDTH  # channels of conv1 and layer1, doubled per stage: 64 is ResNet18 (pretrained
    # files exist only at 64); 16 or 8 is a quick CPU model with every module and key name (~1/16, ~1/64 the weights)
    cbam: CBAMConfig = field(default_factory=CBAMConfig)


@dataclass
class DataConfig:
    name: str = "cifar10"  # cifar10 | imagefolder | synthetic
    root: Optional[str] = None  # cifar10: folder holding cifar-10-batches-py/; imagefolder: holding train/
    download: bool = True  # cifar10 only
    image_size: int = 32  # imagefolder images are resized to this; synthetic images are generated at it
    num_classes: int = 10  # synthetic only; cifar10 has 10, imagefolder counts its class folders
    train_size: int = 2000  # synthetic only: images generated for the train (+val) pool
    test_size: int = 500  # synthetic only
    val_size: int = 5000  # held out from train, stratified, deterministic for a seed
    limit: Optional[int] = None  # use at most this many training images (stratified), after the val split
    batch_size: int = 64
    eval_batch_size: int = 512
    loader: str = "auto"  # memory: uint8 tensor on the device + batched augmentation | torchvision | auto
    memory_budget_mb: int = 4096  # auto picks memory when the decoded splits fit in this
    augment_chunk: int = 4096  # memory loader: images augmented per call (rounded to whole batches)
    num_workers: int = 4  # torchvision loader only
    bad_images: str = "error"  # imagefolder: a corrupt or truncated image stops the run (error) or is dropped (skip)
    mean: Optional[List[float]] = None  # per-channel, in [0, 1]; null: measured on the train split
    std: Optional[List[float]] = None


@dataclass
class CropConfig:
    enabled: bool = True
    padding: int = 4  # pixels on each side; the crop size is data.image_size


@dataclass
class FlipConfig:
    enabled: bool = True
    p: float = 0.5


@dataclass
class ColorJitterConfig:
    enabled: bool = True
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.1


@dataclass
class RotationConfig:
    enabled: bool = True
    degrees: float = 15.0  # uniform in [-degrees, +degrees]


@dataclass
class EraseConfig:
    """torchvision's RandomErasing, on the normalised image (value 0: the data's mean colour)."""

    enabled: bool = False
    p: float = 0.5  # probability that an image gets a rectangle erased
    scale: List[float] = field(default_factory=lambda: [0.02, 0.33])  # erased area, fraction of the image
    ratio: List[float] = field(default_factory=lambda: [0.3, 3.3])  # aspect ratio (h / w), drawn log-uniform
    value: float = 0.0  # fill, in normalised units


@dataclass
class CutoutConfig:
    """airbench's cutout: a size x size square, wholly inside the image, filled with 0 after normalisation."""

    enabled: bool = False
    size: int = 12  # pixels per side
    p: float = 1.0  # probability that an image gets its square


@dataclass
class MixConfig:
    """Batch-level MixUp / CutMix (timm's Mixup in batch mode, torchvision v2's pairing: the batch rolled by 1)."""

    mixup_alpha: float = 0.0  # Beta(alpha, alpha) for the mixing weight; 0: no MixUp
    cutmix_alpha: float = 0.0  # 0: no CutMix
    prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # with both alphas > 0: probability of CutMix rather than MixUp


@dataclass
class AugmentConfig:
    name: str = "seed"
    crop: CropConfig = field(default_factory=CropConfig)
    flip: FlipConfig = field(default_factory=FlipConfig)
    color_jitter: ColorJitterConfig = field(default_factory=ColorJitterConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    policy: str = "none"  # none | trivial (TrivialAugmentWide) | autoaugment (AutoAugment's CIFAR-10 policy)
    erase: EraseConfig = field(default_factory=EraseConfig)
    cutout: CutoutConfig = field(default_factory=CutoutConfig)
    mix: MixConfig = field(default_factory=MixConfig)


@dataclass
class SchedConfig:
    name: str = "constant"  # the lr within a stage, per step: constant | cosine (to min_lr_ratio x lr) | step
    warmup_epochs: float = 0.0  # linear warm-up from ~0 to the stage's lr over this many epochs at its start
    min_lr_ratio: float = 0.0  # cosine: lr at the stage's last step, as a fraction of the stage's lr
    step_size: int = 10  # step: the lr is multiplied by gamma every step_size epochs of the stage (torch's StepLR)
    gamma: float = 0.1  # step


@dataclass
class PlateauConfig:
    patience: Optional[int] = None  # epochs without an improvement that end the stage; null: off
    min_delta: float = 0.0  # an improvement must beat the stage's best by more than this
    metric: str = "val_acc"  # val_acc | val_loss
    restore_best: bool = True  # when the stage ends, load its best weights (before the next stage / the test)


@dataclass
class StageConfig:
    epochs: int = 1
    lr: Optional[float] = 1e-3  # null: found by an lr range test (as task=lr_find's) at the stage's start
    trainable: List[str] = field(default_factory=lambda: ["all"])
    sched: SchedConfig = field(default_factory=SchedConfig)
    # module path -> multiplier of the stage's lr ({layer1: 0.1, layer4.1: 0.5}); unlisted trainable modules: 1.0
    lr_mult: Dict[str, float] = field(default_factory=dict)
    # null, or in (0, 1]: fc gets the stage's lr and each step down (layer4, layer3, layer2, layer1, stem) x decay
    layer_decay: Optional[float] = None
    # end the stage early, epochs then being a maximum: on once until_plateau.patience is set
    # (null, or patience null: off)
    until_plateau: Optional[PlateauConfig] = field(default_factory=PlateauConfig)


DEFAULT_AUTO_GROUPS = [["layer4"], ["layer3"], ["layer2"], ["layer1", "conv1", "bn1"]]


@dataclass
class AutoScheduleConfig:
    """schedule=auto: gradual unfreezing planned from the network. The first stage trains what is new (fc, CBAM and
    any module no weights file filled); each further stage adds the next group down. Every stage's lr is found by a
    range test at its start (the lr_find.* keys: range, steps) and each stage ends on its plateau."""

    enabled: bool = False  # true: schedule.stages is generated at start-up (and must be empty)
    groups: List[List[str]] = field(default_factory=lambda: [list(g) for g in DEFAULT_AUTO_GROUPS])  # head down
    max_epochs: int = 10  # per stage: the most epochs it trains if no plateau ends it first
    patience: int = 2  # epochs without an improvement of `metric` that end a stage (until_plateau.patience)
    min_delta: float = 0.0
    metric: str = "val_acc"  # val_acc | val_loss
    restore_best: bool = True  # a stage that ends keeps its best epoch's weights
    lr_scale: float = 1.0  # each stage's lr = its range test's suggestion x this
    layer_decay: Optional[float] = None  # in (0, 1]: each stage's layer_decay (deeper groups slower, as ULMFiT's)


@dataclass
class ScheduleConfig:
    name: str = "seed"
    freeze_bn: bool = True  # BatchNorm layers of frozen modules stay in eval mode (stats frozen too)
    stages: Dict[str, StageConfig] = field(default_factory=dict)  # in run order
    auto: AutoScheduleConfig = field(default_factory=AutoScheduleConfig)


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | sgd
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adam
    eps: float = 1e-8  # adam
    fused: Optional[bool] = None  # fused kernels; null: on CUDA


@dataclass
class DeviceConfig:
    name: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32: autocast dtype
    channels_last: Optional[bool] = None  # null: on CUDA only
    compile: bool = False  # torch.compile the model, recompiled at each stage boundary
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune
    compile_backend: str = "inductor"  # inductor | aot_eager (debugging) | eager
    cudnn_benchmark: bool = True  # CUDA only
    sync_bn: bool = False  # torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)
    # torch's CPU threads per process; null: OMP_NUM_THREADS when set, else the process's CPU share (its affinity,
    # SLURM_CPUS_PER_TASK, a cgroup quota: the fewest), so jobs sharing a node do not oversubscribe it
    threads: Optional[int] = None


@dataclass
class LogConfig:
    mode: str = "auto"  # auto: rich on a terminal, plain otherwise | rich | plain | quiet
    every_n_steps: int = 50  # plain mode: one line every N batches; also how often the bar syncs
    curves_every_s: Optional[float] = 20.0  # redraw curves.png after an epoch if this long since the last (0: every
    # epoch; null: never); always drawn at the end of the run
    attention_report: bool = True  # at each stage end: attention/stage<k>-<name>.png (+ -gates.png) from the val
    # split and one row per CBAM module in attention.jsonl (see task=explain)
    show_config: str = "compact"  # the config at the start of a run: compact (groups, overrides, values that differ
    # from the defaults) | full (the whole tree) | none; .hydra/config.yaml in the run dir always has all of it


@dataclass
class LoggerConfig:
    """Set by conf/logger/*.yaml; `logger=[tensorboard,mlflow]` selects both (each file sets its own flag)."""

    tensorboard: bool = False  # scalars per epoch in <run dir>/tensorboard (needs the tensorboard package)
    mlflow: bool = False  # one MLflow run per training run (needs the [mlflow] extra); see tracking.py
    tracking_uri: Optional[str] = None  # mlflow: a folder (null: ./mlruns) holding mlflow.db and the artifacts, or
    # a URI with a scheme passed to MLflow as is (sqlite:///path.db, http://host:5000, postgresql://...)
    experiment: Optional[str] = None  # mlflow: the experiment's name (null: hydra.job.name, "cbam-train")
    log_model: bool = False  # mlflow: also log model.pt (~45 MB for ResNet18) as an artifact


@dataclass
class TrainConfig:
    nan_policy: str = "stop"  # stop: a non-finite loss ends the run (last good checkpoint kept) | skip_batch
    checkpoint_every_n_epochs: int = 1  # checkpoints/last.pt every N epochs (and at every stage end); 0: never
    checkpoint_every_n_steps: int = 0  # also mid-epoch, every N batches (0: off); resumes exactly mid-epoch
    label_smoothing: float = 0.0  # cross-entropy target smoothing in training (evaluation loss is plain)
    ema_decay: Optional[float] = None  # e.g. 0.999: evaluate and save an exponential moving average of the
    # weights (and BatchNorm statistics), updated after every step; null: off
    grad_clip_norm: Optional[float] = None  # clip the gradients' total L2 norm to this before each step; null: off
    accumulate_steps: int = 1  # batches per optimizer step: effective batch = data.batch_size x this


@dataclass
class EvalConfig:
    split: str = "test"  # test | val (the held-out validation split, as training made it)
    flip_tta: bool = False  # average the logits of each image and its horizontal mirror (val, test, task=eval)


@dataclass
class SweepConfig:
    fail_fast: bool = False  # -m: a failed job stops the sweep (false: it is recorded and the sweep goes on)


@dataclass
class BenchConfig:
    seconds: float = 5.0  # timing budget per measurement, after warm-up
    warmup_steps: int = 3
    max_steps: int = 200  # per measurement, whichever comes first


@dataclass
class LrFindConfig:
    """task=lr_find: an exponential lr sweep over one stage (the stage's lr, every group keeping its lr_mult)."""

    min_lr: float = 1e-7  # the first step's lr
    max_lr: float = 1.0  # the last step's lr, unless the loss diverges first
    steps: int = 100  # optimizer steps from min_lr to max_lr (train.accumulate_steps batches each); the loader repeats
    smooth: float = 0.9  # EMA factor of the loss, bias-corrected (as fastai's); 0: no smoothing
    diverge_factor: float = 4.0  # stop once the smoothed loss exceeds this x the best smoothed loss so far


@dataclass
class PredictConfig:
    top_k: int = 3  # classes (with probabilities) per image in predictions.csv; 1..number of classes
    batch_size: int = 256  # images decoded and run through the model per forward pass


@dataclass
class ExportConfig:
    format: str = "onnx"  # onnx (model.onnx, needs the [export] extra) | torchscript (model.ts)
    opset: int = 18  # onnx: the ONNX opset; torch's exporter (torch.export based) emits 18 or newer
    check_images: int = 64  # validation images the exported model and the PyTorch model are compared on


@dataclass
class ExplainConfig:
    """task=explain (and log.attention_report): which images the attention pictures look at."""

    split: str = "val"  # val (the held-out validation split, as training made it) | test
    per_class: int = 2  # images per class: the first ones of each class in the split's fixed order
    all_blocks: bool = False  # placement=block: every block's CBAM (8), not only each stage's last block


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    log: LogConfig = field(default_factory=LogConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    lr_find: LrFindConfig = field(default_factory=LrFindConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    stage: str = "all"  # all | 1-based stage number | stage name
    lr: Optional[float] = None  # lr of the first stage that runs; later stages keep their ratio
    init_from: Optional[str] = None  # weights to start from (e.g. stage 1's model.pt for stage=2)
    resume: Optional[str] = None  # a run dir or checkpoint file: continue that run exactly (into its run dir)
    checkpoint: Optional[str] = None  # task=eval|predict|export|explain: a model.pt or checkpoint file
    inputs: Optional[str] = None  # task=predict: an image file, a folder (searched recursively) or a glob
    seed: int = 0
    task: str = "train"  # a name in config/tasks.py TASKS: train | eval | bench | lr_find | predict | export | explain
    optimized_metric: str = "best_val_acc"  # task=train: the summary.json field returned to a sweeper (Optuna)
    experiment: Optional[str] = None  # name of the experiment preset, set by conf/experiment/*.yaml


EXPORT_FORMATS = ("onnx", "torchscript")
SHOW_CONFIG = ("compact", "full", "none")
# summary.json's numbers, any of which optimized_metric may name (maximize the accuracies, minimize the rest)
SUMMARY_METRICS = ("best_val_acc", "final_val_acc", "test_acc", "test_loss", "epochs_run", "wall_time_s")
