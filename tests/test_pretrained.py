"""Initial weights: torchvision's ImageNet ResNet18 through the torch hub cache (offline: one clear line),
`model.weights` files, and what is reported as newly initialised."""

import urllib.error

import pytest
import torch
from conftest import assert_same_state

from cbam_train.config.errors import WeightsError
from cbam_train.models.resnet import ResNetCBAM
from cbam_train.state.weights import imagenet_resnet18_state_dict, load_initial_weights

TV_FILE = "resnet18-f37072fd.pth"


# --- ImageNet weights through the torch hub cache ----------------------------------------------

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub dir; any download attempt fails as if offline."""
    hub_dir = tmp_path / "torch_home" / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub_dir))
    calls = []

    def offline(url, dst, *a, **k):
        calls.append(url)
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return hub_dir, calls


def test_imagenet_weights_offline_message(hub):
    hub_dir, calls = hub
    with pytest.raises(WeightsError) as e:
        imagenet_resnet18_state_dict()
    msg = str(e.value)
    assert calls and calls[0].endswith(TV_FILE)
    assert "\n" not in msg
    assert str(hub_dir / "checkpoints" / TV_FILE) in msg
    assert "model.weights=" in msg and "model.pretrained=false" in msg and "offline" in msg
    assert not (hub_dir / "checkpoints" / TV_FILE).exists()


def test_imagenet_weights_from_cache_without_download(hub, tv_state, monkeypatch):
    hub_dir, _ = hub

    def no_download(*a, **k):
        pytest.fail("download attempted although the file is cached")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(tv_state, hub_dir / "checkpoints" / TV_FILE)
    assert_same_state(imagenet_resnet18_state_dict(), tv_state)


def test_pretrained_initial_weights_from_cache(hub, tv_state):
    hub_dir, calls = hub
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(tv_state, hub_dir / "checkpoints" / TV_FILE)
    model = ResNetCBAM(num_classes=10)
    report = load_initial_weights(model, None, pretrained=True)
    assert calls == []
    assert report.new_modules == ["conv1", "fc", "cbam"]
    assert torch.equal(model.state_dict()["layer3.0.conv1.weight"], tv_state["layer3.0.conv1.weight"])


def test_imagenet_weights_uncreatable_cache_dir(tmp_path, monkeypatch, hub):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(blocker))
    with pytest.raises(WeightsError):
        imagenet_resnet18_state_dict()


def test_load_initial_weights_nothing_asked(hub):
    _, calls = hub
    torch.manual_seed(0)
    model = ResNetCBAM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_initial_weights(model, weights=None, pretrained=False) is None
    assert_same_state(model.state_dict(), before)
    assert calls == []


def test_load_initial_weights_file_overrides_pretrained(hub, tmp_path, tv_state):
    _, calls = hub
    torch.save({"model": tv_state}, tmp_path / "w.pt")
    model = ResNetCBAM(num_classes=10)
    report = load_initial_weights(model, str(tmp_path / "w.pt"), pretrained=True)
    assert calls == []
    assert report.new_modules == ["conv1", "fc", "cbam"]
    assert torch.equal(model.state_dict()["layer1.0.bn1.running_var"], tv_state["layer1.0.bn1.running_var"])


def test_weights_file_that_matches_nothing_is_refused(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    model = ResNetCBAM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match="no tensor in .* matches this model.*encoder.weight"):
        load_initial_weights(model, str(tmp_path / "other.pt"), pretrained=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
