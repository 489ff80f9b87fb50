"""Data-parallel training under torchrun on the CPU (gloo, 2 processes): same batches as one process at
the global batch size, rank-0-only outputs, exact resume of a 2-process run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NARROW, PICTURES_OFF, call_cli, child_env, default_dtype

from cbam_train.data.datasets import SeededOrder, shard_order
from cbam_train.training.distributed import Dist, sync_batchnorm

BASE = ["experiment=smoke", NARROW, "data.image_size=8", "data.train_size=224", "data.val_size=32", "data.test_size=32",
        "augment=none", "log.mode=plain", "log.every_n_steps=4"]


FLOAT64_CLI = str(Path(__file__).with_name("float64_cli.py"))


def torchrun(args: list, cwd: Path, nproc: int = 2, float64: bool = False) -> subprocess.CompletedProcess:
    env = child_env({"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})  # gloo on loopback, whatever the hostname
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *([FLOAT64_CLI] if float64 else ["-m", "cbam_train"]), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def single(args: list, cwd: Path, float64: bool = False) -> subprocess.CompletedProcess:
    """One process's run, in this one (cli.main); float64 as tests/float64_cli.py gives torchrun's processes."""
    with default_dtype(torch.float64 if float64 else torch.get_default_dtype()):
        return call_cli(args, cwd)


def float64_weights_match(a: Path, b: Path) -> tuple:
    """Two float64 runs' model.pt agree within 1e-9 on every float tensor (see the tolerance argument below);
    returns both state dicts."""
    sa, sb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    assert sa["fc.weight"].dtype == torch.float64  # the runs really were float64
    worst = max((sa[k] - sb[k]).abs().max().item() for k in sa if sa[k].is_floating_point())
    assert worst <= 1e-9, worst
    return sa, sb


def rows(run: Path) -> list:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_shards_of_each_global_batch_are_the_single_process_batch():
    order = torch.randperm(70, generator=torch.Generator().manual_seed(0))
    shards = [shard_order(order, 8, r, 2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 32  # 70 // 16 = 4 whole global batches of 16
    for k in range(4):  # batch k of rank 0 then rank 1 == global batch k of one process at batch 16
        assert torch.equal(torch.cat([s[8 * k:8 * k + 8] for s in shards]), order[16 * k:16 * k + 16])
    samplers = [SeededOrder(70, True, torch.Generator().manual_seed(3), 8, (r, 2)) for r in range(2)]
    picks = [list(s) for s in samplers]
    assert len(samplers[0]) == 32 and not {i for i, _ in picks[0]} & {i for i, _ in picks[1]}
    assert len({seed for p in picks for _, seed in p}) == 64  # every image its own augmentation seed


def test_sync_bn_needs_cuda():
    from cbam_train.config.errors import UserError
    from cbam_train.models import ResNetCBAM

    with pytest.raises(UserError, match="device.sync_bn=true needs CUDA"):
        sync_batchnorm(ResNetCBAM(), Dist(0, 2, 0), torch.device("cpu"), True)
    m = ResNetCBAM()
    assert sync_batchnorm(m, Dist(), torch.device("cpu"), True) is m  # one process: nothing to sync


@pytest.mark.slow
def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    """Stage 'head' trains only fc and CBAM, so every BatchNorm layer is frozen (eval mode) and a sample's
    gradient does not depend on its batch: 2 x 16 under DDP must equal 32 in one process up to the rounding
    of sums taken in another order (DDP averages two partial gradients; one process sums all 32).

    Both runs train in float64 (tests/float64_cli.py under torchrun, conftest.default_dtype for the single
    process), so the tolerance follows from the arithmetic, not
    from one CPU: float64's unit roundoff is 2^-53 = 1.1e-16, and 12 SGD steps amplified float32's rounding
    (2^-24) into weight differences of up to 7.1e-6 on one machine, a factor of ~1e2 over weights of O(1);
    the same amplification in float64 gives ~1e-14. A batching or averaging bug moves weights by a share
    of their update (the fc update's norm is ~0.5 here). atol=1e-9 on the weights and rel=1e-9 on the
    losses sit orders of magnitude from both. val_loss is computed from float32 logits (evaluate casts
    them): summing 32 of them in another order changes it by at most ~32 x 2^-24 = 2e-6 relative."""
    common = BASE + ["stage=head", "schedule.stages.head.epochs=2", "schedule.stages.head.trainable=[fc,cbam]",
                     "optim=sgd", "lr=0.05", *PICTURES_OFF]
    one = single(common + ["data.batch_size=32", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path, float64=True)
    two = torchrun(common + ["data.batch_size=16", f"hydra.run.dir={tmp_path / 'two'}"], tmp_path, float64=True)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    assert "data-parallel: 2 processes, global batch 32 (16 per process), 6 steps per epoch" in two.stdout
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=False):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-9)
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)
        assert ra["train_acc"] == rb["train_acc"] and ra["val_acc"] == rb["val_acc"]
    sa, sb = float64_weights_match(tmp_path / "one", tmp_path / "two")
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not sa[k].is_floating_point())


@pytest.mark.slow
def test_two_process_run_writes_once_and_resumes_exactly(tmp_path):
    """All stages (BatchNorm training per process), rank 0 alone writes; a 2-process resume from the stage-1
    checkpoint (into a new dir) repeats the rest bit for bit: each rank gets its own random state back."""
    args = BASE + ["data.batch_size=16"]
    full = torchrun(args + [f"hydra.run.dir={tmp_path / 'full'}"], tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    run = tmp_path / "full"
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "attention", "attention.jsonl", "checkpoints",
                                                    "curves.png", "metrics.csv", "metrics.jsonl", "model.pt",
                                                    "summary.json", "train.log"]
    assert len((run / "attention.jsonl").read_text().splitlines()) == 3 * 4  # rank 0's report alone: 3 stages
    assert full.stdout.count("summary") == 1  # one console report, from rank 0
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["world"] == 2 and len(last["rng_ranks"]) == 2
    branch = torchrun([f"resume={run / 'checkpoints' / 'stage1-head.pt'}", f"hydra.run.dir={tmp_path / 'branch'}"],
                      tmp_path)
    assert branch.returncode == 0, branch.stderr[-3000:]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("epoch_time_s", "train_images_per_s")}  # noqa
                        for r in rs]
    assert strip(rows(tmp_path / "branch")) == strip(rows(run))
    sa, sb = (torch.load(d / "model.pt", weights_only=True) for d in (run, tmp_path / "branch"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # one process cannot continue a 2-process checkpoint exactly: refused with the fix
    one = single([f"resume={run / 'checkpoints' / 'stage1-head.pt'}", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 2 and "written by 2 process(es)" in one.stderr
