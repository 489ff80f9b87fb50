"""training/device.py: the CPU share a process may use (affinity, SLURM_CPUS_PER_TASK, a cgroup quota) and the
threads torch gets from it. Stand-in cgroup folders and environments; no training."""

from __future__ import annotations

import os

import pytest
import torch

from cbam_train.training.device import cpu_share, set_threads

AFFINITY = len(os.sched_getaffinity(0))


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def cgroup(folder, v2: str | None = None, v1: tuple | None = None):
    """A stand-in /sys/fs/cgroup in `folder` (new) with a v2 cpu.max line or v1's (quota, period)."""
    root = folder / "cgroup"
    root.mkdir(parents=True)
    if v2 is not None:
        (root / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (root / "cpu").mkdir()
        (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (root / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return root


def test_without_limits_the_share_is_the_affinity_mask(tmp_path):
    assert cpu_share({}, cgroup(tmp_path)) == (AFFINITY, "CPU affinity")
    assert cpu_share({}, cgroup(tmp_path / "max", v2="max 100000")) == (AFFINITY, "CPU affinity")  # no quota
    assert cpu_share({}, cgroup(tmp_path / "a", v1=(-1, 100000)))[0] == AFFINITY
    assert cpu_share({"SLURM_CPUS_PER_TASK": str(AFFINITY + 3)}, cgroup(tmp_path / "b"))[0] == AFFINITY  # the least


def test_slurm_and_cgroup_quotas_lower_the_share(tmp_path):
    assert cpu_share({"SLURM_CPUS_PER_TASK": "1"}, cgroup(tmp_path)) == (1, "SLURM_CPUS_PER_TASK=1")
    # 150 ms per 100 ms: 1.5 CPUs of time, rounded up; a tie with the mask goes to the quota, the more specific
    share = cpu_share({}, cgroup(tmp_path / "a", v2="150000 100000"))
    assert share == ((2, "cgroup cpu.max 150000 100000") if AFFINITY >= 2 else (1, "CPU affinity"))
    assert cpu_share({}, cgroup(tmp_path / "b", v2="50000 100000")) == (1, "cgroup cpu.max 50000 100000")
    assert cpu_share({}, cgroup(tmp_path / "c", v1=(100000, 100000))) == (1, "cgroup cpu.cfs_quota_us")
    assert cpu_share({}, cgroup(tmp_path / "d", v2="garbage"))[0] == AFFINITY  # unreadable: no quota we can use
    assert cpu_share({"SLURM_CPUS_PER_TASK": "0"}, cgroup(tmp_path / "e"))[0] == AFFINITY  # not a share


def test_threads_follow_the_key_then_omp_num_threads_then_the_share(threads_restored):
    assert set_threads(1, {}) == "1 thread(s) (device.threads)" and torch.get_num_threads() == 1
    torch.set_num_threads(AFFINITY)
    assert set_threads(None, {"OMP_NUM_THREADS": "3"}).endswith("(OMP_NUM_THREADS)")
    assert torch.get_num_threads() == AFFINITY  # torch read OMP_NUM_THREADS itself at start: left alone
    assert set_threads(None, {"SLURM_CPUS_PER_TASK": "1"}) == "1 thread(s) (SLURM_CPUS_PER_TASK=1)"
    assert torch.get_num_threads() == 1
