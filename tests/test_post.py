"""`experiment=seed`'s network is the tutorial post's, tensor for tensor: its state dict maps one-to-one onto
the post's ResNet18_CBAM (tests/post_network.py), and with the same weights both give the same logits."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from post_network import PostResNet18CBAM

from cbam_train.models import build_model
from cbam_train.models.post import from_post, is_post_layout, to_post
from cbam_train.state.weights import load_strict, read_weights


def seed_model() -> torch.nn.Module:
    return build_model(compose_config(["experiment=seed", "data.root=/x"]).model)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_seed_state_dict_maps_one_to_one_onto_the_posts():
    ours, post = seed_model().state_dict(), PostResNet18CBAM().state_dict()
    mapped = to_post(ours)
    assert list(mapped) == [k for k in post if k in mapped] and set(mapped) == set(post)  # nothing left over
    assert all(mapped[k].shape == post[k].shape for k in post)
    assert is_post_layout(post) and not is_post_layout(ours)
    back = from_post(post)
    assert set(back) == set(ours) and all(back[k].shape == ours[k].shape for k in ours)
    assert "cbam.layer1.channel.mlp.0.weight" in back and "cbam.layer4.spatial.conv.weight" in back
    assert not any(k.endswith("spatial.conv.bias") for k in ours)  # the post's SpatialAttention: bias=False


def test_identity_init_keeps_its_spatial_bias():
    model = build_model(compose_config(["data.root=/x"]).model)  # the default, model.cbam.init=identity
    assert all(f"cbam.layer{k}.spatial.conv.bias" in model.state_dict() for k in range(1, 5))
    with pytest.raises(ValueError, match="cbam.layer1.spatial.conv.bias: the post's network has no such tensor"):
        to_post(model.state_dict())


@pytest.mark.parametrize("direction", ["post->ours", "ours->post"])
def test_same_weights_give_the_posts_logits_in_train_and_eval_mode(direction):
    """Relative tolerance 1e-5: the two networks run the same float32 operations except for the channel MLP
    (Linear here, 1x1 conv there) and the pooling kernels, whose summation orders may differ; that moves
    logits by float32 roundings (measured: 8e-8 in eval and 7e-7 in train mode), while one wrong tensor,
    gate or forward order moves them by percents (channel and spatial attention swapped: 2e-2)."""
    torch.manual_seed(0)
    post, ours = PostResNet18CBAM(), seed_model()
    if direction == "post->ours":
        load_strict(ours, from_post(post.state_dict()), "post")
    else:
        post.load_state_dict(to_post(ours.state_dict()), strict=True)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    post.eval(), ours.eval()
    with torch.no_grad():
        assert rel_diff(ours(x), post(x)) <= 1e-5
        post.train(), ours.train()  # batch statistics, and both update their running statistics
        assert rel_diff(ours(x), post(x)) <= 1e-5
    mine, theirs = to_post(ours.state_dict()), post.state_dict()
    assert all(rel_diff(mine[k].float(), theirs[k].float()) <= 1e-5 for k in theirs if "running" in k)


def test_a_file_the_post_saved_loads_as_weights(tmp_path):
    post = PostResNet18CBAM()
    path = tmp_path / "resnet18_cbam_finetuned.pth"  # what the post's main() writes: torch.save(state_dict)
    torch.save(post.state_dict(), path)
    state, ckpt = read_weights(path)
    assert ckpt is None and set(state) == set(seed_model().state_dict())
    w = state["cbam.layer2.channel.mlp.2.weight"]
    assert w.shape == (128, 8, 1, 1) and torch.equal(w.flatten(1), post.cbam_layer2.channel_attn.fc[2].weight)


@pytest.mark.slow
def test_task_eval_of_a_post_file_equals_the_post_network(tmp_path):
    """`task=eval checkpoint=<the post's .pth> experiment=seed` measures what the post's own network measures
    on the same normalised test images."""
    from cbam_train.data.datasets import build_splits
    from cbam_train.data.loaders import build_eval_loader
    from cbam_train.tasks.evaluate import run_eval
    from cbam_train.training.engine import evaluate

    torch.manual_seed(0)
    post = PostResNet18CBAM()
    path = tmp_path / "post.pth"
    torch.save(post.state_dict(), path)
    cfg = compose_config(["experiment=seed", "task=eval", f"checkpoint={path}", "data=synthetic",
                          "data.image_size=16", "data.train_size=64", "data.val_size=16", "data.test_size=48",
                          "data.num_classes=10", "device=cpu", "log.mode=quiet"])
    assert cfg.data.std == [0.2023, 0.1994, 0.2010]  # the preset's normalisation, on any data
    out = run_eval(cfg, tmp_path / "eval")
    splits = build_splits(cfg.data, cfg.seed, 10)
    loader = build_eval_loader(splits.test, cfg.data, "memory", torch.device("cpu"), splits.mean, splits.std, 0)
    ref = evaluate(post, loader, torch.device("cpu"))
    assert out["n"] == 48 and out["accuracy"] == pytest.approx(ref["acc"], abs=1e-12)
    assert out["loss"] == pytest.approx(ref["loss"], rel=1e-5)
