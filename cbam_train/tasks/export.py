"""`cbam-train task=export checkpoint=PATH export.format=onnx|torchscript`: the model with its normalisation
built in (float RGB in [0, 1], NCHW, any batch size) as model.onnx or model.ts, with model.json, checked
against the PyTorch model on real validation images before success is reported."""

from __future__ import annotations

import dataclasses
import importlib.util
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from cbam_train.config.errors import ExportError
from cbam_train.config.schema import Config
from cbam_train.config.tasks import JobInfo
from cbam_train.data.datasets import build_splits
from cbam_train.reporting.reporter import Reporter
from cbam_train.state.atomic import write_json_atomic
from cbam_train.state.rundir import check_run_dir, write_record
from cbam_train.tasks.predict import Trained, load_trained

FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.ts"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# How far the exported model's logits may be from PyTorch's, relative to the scale float32 rounding is relative
# to: for a logit, sum_i |w_ci a_i| + |b_c| (fc's terms before they cancel), the largest over the batch. Both
# compute the same float32 graph in another order (onnxruntime folds BatchNorm into the convs, picks its own
# kernels). Reordering a float32 sum of n terms moves it by about sqrt(n) * u of the sum of |terms| (u = 2^-24 =
# 6e-8, random rounding): ~4e-6 for the longest dot products here (3x3x512 = 4,608 terms). ResNet18 + CBAM has
# ~20 such layers in sequence (convs, CBAM's MLP and conv, fc), and BatchNorm keeps activations O(1), so the
# relative errors add rather than compound: ~20 x 4e-6 = 8e-5. 1e-3 leaves >10x for the worst-case (n * u) tail
# and exp/sigmoid in CBAM's gates; a real export bug on a trained model (no normalisation, a wrong layout,
# BatchNorm in train mode) moves logits by O(1) of that scale.
RELATIVE_TOLERANCE = 1e-3


class Normalised(nn.Module):
    """The trained model behind its input normalisation: float RGB in [0, 1], shape (B, 3, H, W) -> logits."""

    mean: torch.Tensor  # buffers, registered in __init__: nn.Module types them as Tensor | Module otherwise
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: list, std: list) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def check_onnx_packages() -> None:
    """One line naming the extra when onnx, onnxscript or onnxruntime is missing."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"export.format=onnx needs {', '.join(ONNX_PACKAGES)} (missing: {', '.join(missing)}); "
                          "pip install 'cbam-train[export]', or use export.format=torchscript")


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """module -> ONNX at path (torch.export-based exporter), input 'images' with a dynamic batch dimension."""
    from torch.export import Dim

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals, nothing the user can act on
        torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"images": {0: Dim("batch")}}, opset_version=opset, dynamo=True,
                          external_data=False, verbose=False)


def export_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """module -> TorchScript at path, traced: the graph has no data-dependent branches, and the batch stays free."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream but still loads everywhere
        traced = torch.jit.trace(module, example)
        torch.jit.save(traced, str(path))


def exported_runner(fmt: str, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the exported file as a user would (onnxruntime / torch.jit.load): images -> logits."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda x: loaded(x).detach()


def compare(reference: Normalised, run: Callable, images: torch.Tensor) -> dict:
    """Max abs logit difference, its tolerance and the top-1 agreement of `run` against `reference` on images."""
    fc = reference.model.fc
    assert isinstance(fc, nn.Linear)  # ResNetCBAM's classifier (models/resnet.py)
    features = []
    hook = fc.register_forward_pre_hook(lambda _m, args: features.append(args[0]))
    try:
        with torch.inference_mode():
            want = reference(images).float()
            scale = (features[0].abs() @ fc.weight.abs().T + fc.bias.abs()).max().item()  # sum of |terms| per logit
    finally:
        hook.remove()
    got = run(images).float()
    if got.shape != want.shape:
        raise ExportError(f"the exported model gives logits of shape {tuple(got.shape)} for {tuple(images.shape)}; "
                          f"PyTorch gives {tuple(want.shape)}")
    diff = (got - want).abs().max().item()
    agree = (got.argmax(1) == want.argmax(1)).float().mean().item()
    return {"max_abs_logit_diff": diff, "tolerance": RELATIVE_TOLERANCE * scale, "top1_agreement": agree,
            "check_images": len(images)}


def check_images(cfg: Config, trained: Trained, n: int, warn: Callable[[str], None]) -> torch.Tensor:
    """Up to n real images, float [0, 1] (N, 3, S, S), from the checkpoint's data config: validation split first."""
    data_cfg = dataclasses.replace(cfg.data, mean=trained.mean, std=trained.std)  # nothing to measure
    splits = build_splits(data_cfg, cfg.seed, cfg.model.num_classes, warn=warn)
    for ds in (splits.val, splits.test, splits.train):
        if ds is not None and len(ds):
            ds.indices = ds.indices[:n]
            return ds.materialize()[0].float() / 255
    raise ExportError(f"data={cfg.data.name}: no images to check the export on")


def run_export(cfg: Config, run_dir: Path, record: Optional[dict] = None, job: Optional[JobInfo] = None) -> dict:
    """Export cfg.checkpoint as cfg.export.format into run_dir, check it, write model.json."""
    t0 = time.perf_counter()
    run_dir, fmt = Path(run_dir), cfg.export.format
    if fmt == "onnx":
        check_onnx_packages()
    warnings_seen: list = []
    trained = load_trained(cfg, warnings_seen.append)
    name = FILE_NAMES[fmt]
    check_run_dir(run_dir, (name, "model.json", "train.log"))
    write_record(run_dir, record)
    rep = Reporter(run_dir, cfg.log.mode)
    with rep.closed_after():
        for w in warnings_seen:
            rep.warn(w)
        images = check_images(cfg, trained, cfg.export.check_images, rep.warn)
        module = Normalised(trained.model.cpu(), trained.mean, trained.std).eval()
        size = cfg.data.image_size
        example = torch.rand(2, 3, size, size)  # a batch of 2: the check then runs another batch size
        out = run_dir / name
        try:
            export_onnx(module, example, out, cfg.export.opset) if fmt == "onnx" else \
                export_torchscript(module, example, out)
        except OSError:  # the disk or the folder: cli's one line for the machine's errors
            raise
        except Exception as e:  # the exporter's own failure: its first line, not a page of graph dumps
            raise ExportError(f"export.format={fmt}: the exporter failed ({str(e).strip().splitlines()[0][:200]})") \
                from None
        check = compare(module, exported_runner(fmt, out), images)
        rep.print(f"check on {check['check_images']} validation image(s): max abs logit difference "
                  f"{check['max_abs_logit_diff']:.2e} (tolerance {check['tolerance']:.2e}), top-1 agreement "
                  f"{100 * check['top1_agreement']:.1f}%", quiet_too=True)
        if check["max_abs_logit_diff"] > check["tolerance"]:
            out.unlink()
            raise ExportError(f"export.format={fmt}: the exported model's logits differ from PyTorch's by "
                              f"{check['max_abs_logit_diff']:.3g} (> tolerance {check['tolerance']:.3g}) on "
                              f"{check['check_images']} validation images; {name} removed")
        model_json = {"file": name, "format": fmt, "classes": trained.classes, "image_size": size,
                "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0],
                          "channels": "RGB", "batch": "dynamic"},
                "output": {"name": "logits", "shape": ["batch", len(trained.classes)]},
                "mean": trained.mean, "std": trained.std, "normalisation": "included in the graph",
                "source_checkpoint": str(trained.source), "weights": trained.weights,
                "model": dataclasses.asdict(cfg.model), "torch_version": torch.__version__, **check}
        if fmt == "onnx":
            model_json["opset"] = cfg.export.opset
        write_json_atomic(run_dir / "model.json", model_json)
        rep.print(f"exported {trained.source} -> {out} ({out.stat().st_size / 2**20:.1f} MiB) and "
                  f"{run_dir / 'model.json'} in {time.perf_counter() - t0:.1f} s", quiet_too=True)
        return model_json
