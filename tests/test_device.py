"""training/device.py: the CPU share a process may use (affinity, SLURM_CPUS_PER_TASK, a cgroup quota of its own
cgroup or a parent's) and the threads torch gets from it. Stand-in cgroup folders and environments; no training."""

from __future__ import annotations

import os

import pytest
import torch

from cbam_train.training.device import cpu_share, set_threads

AFFINITY = len(os.sched_getaffinity(0))
V2_ONLY = "0::/"  # /proc/self/cgroup of a process in the root cgroup of a v2 hierarchy


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def folder_with(tmp_path, files: dict):
    """A stand-in /sys/fs/cgroup holding `files` ({relative path: text})."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    root.mkdir(parents=True, exist_ok=True)
    return root


def test_without_limits_the_share_is_the_affinity_mask(tmp_path):
    assert cpu_share({}, folder_with(tmp_path, {}), V2_ONLY) == (AFFINITY, "CPU affinity")
    assert cpu_share({}, folder_with(tmp_path / "a", {"cpu.max": "max 100000"}), V2_ONLY)[0] == AFFINITY
    v1 = {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}
    assert cpu_share({}, folder_with(tmp_path / "b", v1), "1:cpu:/")[0] == AFFINITY
    assert cpu_share({"SLURM_CPUS_PER_TASK": str(AFFINITY + 3)}, folder_with(tmp_path / "c", {}), V2_ONLY)[0] \
        == AFFINITY  # the least of the limits
    assert cpu_share({"SLURM_CPUS_PER_TASK": "0"}, folder_with(tmp_path / "d", {}), V2_ONLY)[0] == AFFINITY


def test_slurm_and_cgroup_quotas_lower_the_share(tmp_path):
    assert cpu_share({"SLURM_CPUS_PER_TASK": "1"}, folder_with(tmp_path, {}), V2_ONLY) \
        == (1, "SLURM_CPUS_PER_TASK=1")
    # 150 ms per 100 ms: 1.5 CPUs of time, rounded up; a tie with the mask goes to the quota, the more specific
    share = cpu_share({}, folder_with(tmp_path / "a", {"cpu.max": "150000 100000"}), V2_ONLY)
    assert share == ((2, "cgroup cpu.max 150000 100000") if AFFINITY >= 2 else (1, "CPU affinity"))
    # the process's own cgroup is nested (a host without a cgroup namespace); its parent holds the quota
    nested = folder_with(tmp_path / "b", {"job/cpu.max": "50000 100000", "job/task/cpu.max": "max 100000"})
    assert cpu_share({}, nested, "0::/job/task") == (1, "cgroup cpu.max 50000 100000")
    v1 = {"cpu,cpuacct/slurm/cpu.cfs_quota_us": "100000", "cpu,cpuacct/slurm/cpu.cfs_period_us": "100000"}
    assert cpu_share({}, folder_with(tmp_path / "c", v1), "2:cpu,cpuacct:/slurm") == (1, "cgroup cpu.cfs_quota_us")
    assert cpu_share({}, folder_with(tmp_path / "d", {"cpu.max": "garbage"}), V2_ONLY)[0] == AFFINITY


def test_threads_follow_the_key_then_omp_num_threads_then_the_share(threads_restored):
    assert set_threads(1, {}) == "1 thread(s) (device.threads)" and torch.get_num_threads() == 1
    torch.set_num_threads(AFFINITY)
    assert set_threads(None, {"OMP_NUM_THREADS": "3"}).endswith("(OMP_NUM_THREADS)")
    assert torch.get_num_threads() == AFFINITY  # torch read OMP_NUM_THREADS itself at start: left alone
    # this machine's own cgroup may hold a quota of 1 too, which would then be the figure named
    said = set_threads(None, {"SLURM_CPUS_PER_TASK": "1"})
    assert said.startswith("1 thread(s) (") and ("(SLURM_CPUS_PER_TASK=1)" in said or "(cgroup " in said)
    assert torch.get_num_threads() == 1
