"""task=export: every architecture exports to ONNX and TorchScript and computes what PyTorch computes (with the
normalisation inside, any batch size); the self-check's tolerance refuses a wrong graph; bad input is one line;
and through cli.main on a smoke-trained checkpoint, model.onnx / model.ts load without cbam-train."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import NARROW, call_cli, compose_config
from test_predict import TINY, cli_main, random_model  # noqa: F401 (fixtures)

from cbam_train.config.errors import ConfigError
from cbam_train.models import build_model
from cbam_train.tasks.export import (
    RELATIVE_TOLERANCE,
    Normalised,
    compare,
    export_onnx,
    export_torchscript,
    exported_runner,
)

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


ARCHITECTURES = [("stage", "cifar", 8, 64), ("block", "cifar", 8, 8), ("stage", "imagenet", 32, 8),
                 ("block", "imagenet", 32, 8)]


@pytest.mark.slow  # an ONNX export takes 3-7 s on 2 cores (torch.export traces the graph), TorchScript ~1 s
@pytest.mark.parametrize("fmt, placement, stem, size, width",
                         [("torchscript", *a) for a in ARCHITECTURES] + [("onnx", *a) for a in ARCHITECTURES[::3]])
def test_every_architecture_exports_with_its_normalisation(fmt, placement, stem, size, width, tmp_path):
    """TorchScript: each placement with each stem. ONNX: the recipe's own network (stage CBAM, CIFAR stem) at
    ResNet18's width, and block CBAM with the ImageNet stem (its max-pool): between them every op either graph
    holds, since the stem and the CBAM placement are separate parts of it. The others are narrow: the graph's
    ops are the same at any width."""
    cfg = compose_config(["experiment=smoke", f"model.cbam.placement={placement}", f"model.stem={stem}",
                          f"data.image_size={size}", "model.cbam.init=seed",  # seed gates: CBAM is not x -> x
                          f"model.width={width}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    module = Normalised(model, MEAN, STD).eval()
    path = tmp_path / ("model.onnx" if fmt == "onnx" else "model.ts")
    example = torch.rand(2, 3, size, size)
    export_onnx(module, example, path, 18) if fmt == "onnx" else export_torchscript(module, example, path)
    images = torch.rand(5, 3, size, size)  # another batch size than the example's: the batch is dynamic
    check = compare(module, exported_runner(fmt, path), images)
    assert check["max_abs_logit_diff"] <= check["tolerance"] and check["top1_agreement"] == 1.0
    # the normalisation is in the graph: the exported file on [0, 1] images == the bare model on normalised ones
    with torch.inference_mode():
        bare = model((images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    assert (exported_runner(fmt, path)(images) - bare).abs().max() <= check["tolerance"]


def test_the_check_holds_logits_to_the_float32_tolerance():
    """The tolerance is 1e-3 of the largest sum of |fc terms| (fc's input x |weights| + |bias|); a difference
    above it is measured as it is."""
    torch.manual_seed(0)
    model = build_model(compose_config(["experiment=smoke", "model.cbam.init=seed"]).model).eval()
    module = Normalised(model, MEAN, STD).eval()
    images = torch.rand(4, 3, 8, 8)
    same = compare(module, lambda x: module(x).detach(), images)
    assert same["max_abs_logit_diff"] == 0.0 and same["top1_agreement"] == 1.0
    with torch.inference_mode():  # fc's input, as ResNetCBAM.forward computes it
        x = model.maxpool(model.relu(model.bn1(model.conv1((images - module.mean) / module.std))))
        for k in range(1, 5):
            x = model._stage(k, x)
        features = torch.flatten(model.avgpool(x), 1)
        scale = (features.abs() @ model.fc.weight.abs().T + model.fc.bias.abs()).max().item()
    assert same["tolerance"] == pytest.approx(RELATIVE_TOLERANCE * scale)
    off = compare(module, lambda x: module(x).detach() + 1.5 * same["tolerance"], images)
    assert off["max_abs_logit_diff"] == pytest.approx(1.5 * same["tolerance"], rel=1e-3)


@pytest.mark.parametrize("overrides, message", [
    ("task=export", "task=export needs checkpoint=PATH"),
    ("export.format=tflite", "export.format: unknown value 'tflite'; choose one of: onnx, torchscript"),
    ("export.opset=11", "export.opset must be >= 18"),
    ("export.check_images=0", "export.check_images must be > 0"),
])
def test_export_keys_are_validated_at_start_up(overrides, message):
    with pytest.raises(ConfigError) as e:
        compose_config(overrides.split())
    assert message in str(e.value) and "\n" not in str(e.value)


def test_wrong_export_format_is_one_line(random_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    code, lines, run_dir = cli_main(["task=export", NARROW, f"checkpoint={random_model}", "export.format=tflite"],
                                    tmp_path)
    assert code == 2 and len(lines) == 1 and "export.format: unknown value 'tflite'" in lines[0]
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_without_onnx_packages_the_line_says_what_to_install(random_model, tmp_path, monkeypatch,  # noqa: F811
                                                             capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else
                        real(name, *a))
    code, lines, run_dir = cli_main(["task=export", NARROW, f"checkpoint={random_model}"], tmp_path)
    assert code == 2 and len(lines) == 1, lines
    assert "missing: onnxruntime" in lines[0] and "pip install 'cbam-train[export]'" in lines[0]
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_export_of_a_hostile_pickle_runs_nothing(tmp_path, monkeypatch, capsys):
    from bad_input import hostile_file

    path = hostile_file(tmp_path / "evil.pt", tmp_path / "pwned.txt", tmp_path / "proof.txt")
    code, lines, _ = cli_main(["task=export", f"checkpoint={path}"], tmp_path)
    assert code == 2 and len(lines) == 1 and "refused by the weights-only loader" in lines[0]
    assert not (tmp_path / "pwned.txt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt, name", [("onnx", "model.onnx"), ("torchscript", "model.ts")])
def test_export_through_the_cli_loads_without_cbam_train(trained, fmt, name, tmp_path):
    out = tmp_path / "out"
    proc = call_cli(["task=export", f"checkpoint={trained / 'checkpoints' / 'last.pt'}", f"export.format={fmt}",
                    "log.mode=plain", f"hydra.run.dir={out}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "check on 16 validation image(s): max abs logit difference" in proc.stdout and "\x1b[" not in proc.stdout
    meta = json.loads((out / "model.json").read_text())
    summary = json.loads((trained / "summary.json").read_text())
    assert meta["file"] == name and meta["format"] == fmt and meta["image_size"] == 8
    assert meta["classes"] == summary["classes"]
    assert (meta["mean"], meta["std"]) == (summary["data_mean"], summary["data_std"])
    assert meta["source_checkpoint"] == str(trained / "checkpoints" / "last.pt")
    assert ("opset" in meta) == (fmt == "onnx") and meta["torch_version"] == torch.__version__
    assert meta["max_abs_logit_diff"] <= meta["tolerance"] and meta["top1_agreement"] == 1.0
    # what the README tells a user to do, against the trained weights run by hand
    x = torch.rand(3, 3, 8, 8)
    if fmt == "onnx":
        import onnxruntime as ort

        logits = ort.InferenceSession(str(out / name)).run(None, {"images": x.numpy()})[0]
    else:
        with pytest.warns(FutureWarning):  # torch.jit is deprecated upstream (2.14), still loads
            logits = torch.jit.load(str(out / name))(x).detach().numpy()
    model = build_model(compose_config(TINY).model)
    model.load_state_dict(torch.load(trained / "model.pt", weights_only=True))
    with torch.inference_mode():
        mean, std = (torch.tensor(meta[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        want = model.eval()((x - mean) / std)
    assert torch.from_numpy(logits).sub(want).abs().max() <= meta["tolerance"]


@pytest.mark.slow
def test_on_a_trained_model_a_graph_without_its_normalisation_fails_the_check(trained):  # noqa: F811
    """The classic export bug, on real (validation) images of the trained run: far outside the tolerance."""
    from cbam_train.tasks.export import check_images
    from cbam_train.tasks.predict import load_trained

    cfg = compose_config(TINY + [f"checkpoint={trained / 'model.pt'}"])
    loaded = load_trained(cfg)
    module = Normalised(loaded.model, loaded.mean, loaded.std).eval()
    images = check_images(cfg, loaded, 16, lambda s: None)
    assert images.shape == (16, 3, 8, 8) and 0 <= images.min() and images.max() <= 1
    wrong = compare(module, lambda x: loaded.model(x).detach(), images)
    assert wrong["max_abs_logit_diff"] > 10 * wrong["tolerance"]
