"""task=bench: bench.json holds every measure, per stage, with positive rates."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config

from cbam_train.config.errors import UserError
from cbam_train.tasks.bench import images_per_s, run_bench

TINY = ["task=bench", "experiment=smoke", "data.image_size=8", "data.train_size=96", "data.val_size=32",
        "data.test_size=32", "data.batch_size=16", "bench.seconds=0.2", "bench.max_steps=4", "bench.warmup_steps=1",
        "log.mode=plain"]
KEYS = {"augment_images_per_s", "loader_images_per_s", "train_images_per_s", "bare_step_images_per_s",
        "loop_overhead_pct", "eval_images_per_s", "peak_memory_mb", "device", "precision", "loader", "batch_size",
        "train_end_to_end_images_per_s"}


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["memory", "torchvision"])
def test_bench_writes_every_measure(tmp_path, capsys, loader):
    out = run_bench(compose_config(TINY + [f"data.loader={loader}", "data.num_workers=0"]), tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert KEYS <= set(saved) and saved == json.loads(json.dumps(out))
    assert saved["device"] == "cpu" and saved["precision"] == "fp32" and saved["loader"] == loader
    assert set(saved["train_images_per_s"]) == {"head", "high", "full"} == set(saved["bare_step_images_per_s"])
    assert all(v > 0 for v in saved["train_images_per_s"].values())
    assert saved["loader_images_per_s"] > 0 and saved["eval_images_per_s"] > 0 and saved["peak_memory_mb"] > 0
    assert saved["train_end_to_end_images_per_s"] > 0
    if loader == "memory":
        assert saved["augment_images_per_s"] > 0
    else:
        assert saved["augment_images_per_s"] is None  # per-image transforms run inside the loader
    assert "training loop, stage 'high'" in capsys.readouterr().out


def test_bench_refuses_a_run_dir_with_results(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bench.json").write_text("{}")
    with pytest.raises(UserError, match="already holds"):
        run_bench(compose_config(TINY), tmp_path / "b")
    assert (tmp_path / "b" / "bench.json").read_text() == "{}"


def test_images_per_s_respects_the_step_budget():
    import torch

    calls = []
    rate = images_per_s(lambda: calls.append(1) or 10, torch.device("cpu"), warmup=2, seconds=60, max_steps=5)
    assert len(calls) == 7 and rate > 0
