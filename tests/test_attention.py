"""attention.py: which CBAM modules a report looks at, that looking changes nothing, gate drift (exactly 0 for an
untrained identity-init model), Grad-CAM against pytorch-grad-cam's numbers, the summaries, and the pictures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from cbam_train.models.resnet import ResNetCBAM
from cbam_train.reporting.attention import (
    above_mean_mass,
    cbam_modules,
    concentration,
    drift,
    grad_cam,
    inspect,
    stratified_pick,
    summarise,
)
from cbam_train.reporting.explain_report import ImageSet, attention_report, draw_report

REFERENCE = Path(__file__).parent / "data" / "gradcam_reference.pt"


def formula_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Weights from a formula, not an RNG: the same network on any machine and torch version (Grad-CAM reference).
    Each tensor: sin(1 + 0.7 i) scaled to He's std for its fan-in; BatchNorm keeps weight 1, bias 0, stats 0/1."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2:
                continue
            fan_in = p[0].numel()
            wave = torch.sin(1.0 + 0.7 * torch.arange(p.numel(), dtype=torch.float64)).view_as(p)
            p.copy_(wave * math.sqrt(2.0 / fan_in) * math.sqrt(2.0))  # sin's rms is 1/sqrt(2)
    return model.eval()


def formula_images(n: int = 4, size: int = 32) -> torch.Tensor:
    """Smooth, different inputs from a formula, roughly normalised: (n, 3, size, size)."""
    i = torch.arange(size, dtype=torch.float64)
    yy, xx = torch.meshgrid(i, i, indexing="ij")
    out = [torch.stack([torch.sin(0.3 * (b + 1) * xx + 0.2 * c * yy + b) for c in range(3)]) for b in range(n)]
    return torch.stack(out).float()


@pytest.mark.parametrize("placement, all_blocks, names", [
    ("stage", False, ["layer1", "layer2", "layer3", "layer4"]),
    ("block", False, ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]),
    ("block", True, [f"layer{k}.{i}" for k in range(1, 5) for i in (0, 1)]),
])
def test_cbam_modules_per_placement(placement, all_blocks, names):
    assert [n for n, _ in cbam_modules(ResNetCBAM(placement=placement, width=8), all_blocks)] == names


def test_no_cbam_means_no_modules_and_grad_cam_only():
    model = ResNetCBAM(cbam_enabled=False, width=8).eval()
    att = inspect(model, torch.randn(2, 3, 16, 16))
    assert att.channel == {} and att.spatial == {}
    assert att.gradcam.shape == (2, 16, 16)


@pytest.mark.parametrize("placement", ["stage", "block"])
def test_untrained_identity_model_has_zero_drift_exactly(placement):
    torch.manual_seed(0)
    model = ResNetCBAM(placement=placement, init="identity", width=8)
    att = inspect(model, torch.randn(3, 3, 32, 32), all_blocks=True)
    summary = summarise(att, torch.tensor([0, 1, 2]), [f"c{i}" for i in range(10)], "identity")
    assert len(summary["modules"]) == (4 if placement == "stage" else 8)
    for m in summary["modules"]:
        assert m["channel_drift"] == 0.0 and m["spatial_drift"] == 0.0, m["name"]
        assert m["channel_gate_mean"] == 1.0
        assert sum(m["channel_hist"]["counts"]) == 3 * m["channels"]
    # a seed-init model's plain sigmoid gates start near 0.5: far from the pass-through
    seed = summarise(inspect(ResNetCBAM(placement=placement, init="seed", width=8), torch.randn(3, 3, 32, 32)),
                     torch.tensor([0, 1, 2]), [f"c{i}" for i in range(10)], "seed")
    assert all(m["channel_drift"] > 0.2 for m in seed["modules"])
    assert "0.5" in seed["reference_means"] and "exactly 1" in summary["reference_means"]


def test_inspect_changes_no_weight_gradient_statistic_or_mode():
    torch.manual_seed(0)
    model = ResNetCBAM(placement="stage", width=8)
    for p in model.layer1.parameters():  # a partly frozen model, as in a stage-end report
        p.requires_grad_(False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    att = inspect(model, torch.randn(4, 3, 32, 32))
    assert model.training and all(m.training for m in model.cbam.modules())
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm running stats included
    assert att.gradcam.shape == (4, 32, 32) and float(att.gradcam.min()) >= 0 and float(att.gradcam.max()) <= 1


def test_inspect_works_with_every_module_frozen():
    model = ResNetCBAM(placement="block", width=8).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    att = inspect(model, torch.randn(2, 3, 32, 32))
    assert att.gradcam.shape == (2, 32, 32) and torch.isfinite(att.gradcam).all()


def test_grad_cam_matches_pytorch_grad_cam_on_a_fixed_model():
    """The reference numbers came from pytorch-grad-cam 1.5.7's GradCAM (tests/make_gradcam_reference.py, run once
    with the package installed; the package pulls opencv and scikit-learn, so cbam-train does not depend on it)."""
    ref = torch.load(REFERENCE, weights_only=True)
    model = formula_weights(ResNetCBAM(num_classes=10, placement=ref["placement"]))
    att = inspect(model, formula_images())
    assert att.pred.tolist() == ref["pred"].tolist()
    # float32 on both sides; cv2's bilinear resize and ours differ by rounding only (~1e-6 on a [0, 1] map)
    assert torch.allclose(att.gradcam, ref["cam"], atol=1e-4), float((att.gradcam - ref["cam"]).abs().max())


def test_grad_cam_matches_the_package_live_when_installed():
    pytest.importorskip("pytorch_grad_cam", reason="pytorch-grad-cam is not installed (pip install grad-cam); the "
                                                   "frozen reference test above covers the comparison")
    from pytorch_grad_cam import GradCAM

    model = formula_weights(ResNetCBAM(num_classes=10, placement="block"))
    x = formula_images()
    ours = inspect(model, x).gradcam
    theirs = torch.from_numpy(GradCAM(model=model, target_layers=[model.layer4[-1]])(input_tensor=x, targets=None))
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_grad_cam_is_relu_of_gradient_weighted_activations():
    acts = torch.zeros(1, 2, 2, 2)
    acts[0, 0, 0, 0] = 3.0  # channel 0 fires top-left; its gradient is positive
    acts[0, 1, 1, 1] = 5.0  # channel 1 fires bottom-right; its gradient is negative: ReLU removes it
    grads = torch.zeros(1, 2, 2, 2)
    grads[0, 0] = 1.0
    grads[0, 1] = -1.0
    cam = grad_cam(acts, grads, (2, 2))
    assert cam[0, 0, 0] == pytest.approx(1.0, abs=1e-6) and float(cam[0].flatten()[1:].max()) == pytest.approx(0.0)


def test_drift_concentration_and_above_mean_mass():
    assert drift(torch.ones(3, 5)) == 0.0 and drift(torch.full((2, 2), 1.5)) == pytest.approx(0.5)
    flat, peak = torch.ones(1, 4, 4), torch.zeros(1, 4, 4)
    peak[0, 1, 2] = 1.0
    assert float(concentration(flat)) == pytest.approx(0.0, abs=1e-12)
    assert float(concentration(peak)) == pytest.approx(1.0)
    m = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])
    assert torch.equal(above_mean_mass(m), torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]))


def test_stratified_pick_takes_the_first_per_class_in_split_order():
    assert stratified_pick([2, 0, 1, 0, 2, 1, 0, 2], 2, 3) == [1, 3, 2, 5, 0, 4]
    assert stratified_pick([1, 1, 0], 5, 3) == [2, 0, 1]  # a short class gives what it has; an absent one nothing


@pytest.mark.parametrize("placement, columns", [("stage", 6), ("block", 6)])
def test_report_pictures_decode_with_the_expected_layout(tmp_path, placement, columns):
    """attention.png: a row per image, a column for the input, each module and Grad-CAM (1.45 in at 100 dpi each);
    gates.png: one panel per module."""
    torch.manual_seed(0)
    model = ResNetCBAM(num_classes=3, placement=placement, width=8)
    picked = ImageSet(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2]), [0, 1, 2])
    summary, drawing = attention_report(model, picked, ["a", "b", "c"], ((0.5,) * 3, (0.25,) * 3),
                                        torch.device("cpu"), "identity")
    warnings = []
    draw_report(summary, drawing, tmp_path / "attention.png", tmp_path / "gates.png", "t", warnings.append)
    assert warnings == []
    with Image.open(tmp_path / "attention.png") as im:
        w, h = im.size
    assert w == round(100 * 1.45 * columns) and h == round(100 * (1.45 * 3 + 0.7))
    with Image.open(tmp_path / "gates.png") as im:
        assert im.size == (round(100 * 3.1 * 4), round(100 * (2.5 + 0.6)))
    assert [r["true"] for r in summary["images"]] == ["a", "b", "c"]


def quadrant_data(n: int, generator: torch.Generator, size: int = 64, classes: int = 4) -> tuple:
    """Images whose label is written in the top-left quadrant alone: stripes at the class's angle. The other three
    quadrants are noise: stripes at a random class's angle each, drawn independently of the label, so a model that
    does not look at the top-left quadrant is at chance. (n, 3, size, size) in [0, 1], labels (n,)."""
    half = size // 2
    i = torch.arange(half, dtype=torch.float32)
    yy, xx = torch.meshgrid(i, i, indexing="ij")
    angles = [torch.tensor(c * math.pi / classes) for c in range(classes)]
    stripes = [(torch.sin((yy * torch.cos(a) + xx * torch.sin(a)) * 0.8) > 0).float() * 0.9 + 0.05 for a in angles]
    x = torch.empty(n, 3, size, size)
    y = torch.randint(0, classes, (n,), generator=generator)
    noise = torch.randint(0, classes, (n, 3), generator=generator)
    for k in range(n):
        x[k, :, :half, :half] = stripes[int(y[k])]
        for q, (r, c) in enumerate(((0, half), (half, 0), (half, half))):
            x[k, :, r:r + half, c:c + half] = stripes[int(noise[k, q])]
    return x, y


def quadrant_share(maps: torch.Tensor) -> torch.Tensor:
    """Per map (B, h, w): the share of its mass in the top-left quadrant."""
    h, w = maps.shape[-2:]
    return maps[:, :h // 2, :w // 2].sum((1, 2)) / maps.sum((1, 2)).clamp_min(1e-12)


@pytest.mark.slow
def test_attention_finds_the_quadrant_that_holds_the_evidence():
    """After a short training on quadrant_data, more than half of the Grad-CAM mass and of the last spatial gate's
    above-mean mass fall in the top-left quadrant (chance: a quarter). 48x48 images, so layer4's maps are 6x6; at
    ResNet18's width, where what a real network learns is the subject. (At 48 px seeds 0, 1 and 2 all clear both
    bars, Grad-CAM at 0.52-0.61 and the gate at 0.82-0.89; 64 px cost twice as much and seed 2 gave 0.44.)"""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y = quadrant_data(256, g, size=48)
    model = ResNetCBAM(num_classes=4, placement="stage", init="identity")
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for _ in range(2):
        order = torch.randperm(len(x), generator=g)
        for b in range(0, len(x), 32):
            idx = order[b:b + 32]
            loss = torch.nn.functional.cross_entropy(model((x[idx] - 0.5) / 0.25), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt, yt = quadrant_data(64, g, size=48)
    att = inspect(model, (xt - 0.5) / 0.25)
    assert float((att.pred == yt).float().mean()) > 0.9  # it learned the task: the maps are worth reading
    cam = float(quadrant_share(att.gradcam).mean())
    gate = float(quadrant_share(above_mean_mass(att.spatial["layer4"])).mean())
    print(f"quadrant share: Grad-CAM {cam:.3f}, layer4 gate {gate:.3f}")
    assert cam > 0.5 and gate > 0.5, (cam, gate)
