"""A SLURM cluster on this machine for the tests: munged, slurmctld and slurmd (Debian's slurm-wlm and munge
packages) started in a folder of their own, with their own config, free ports, munge socket, key and spool, so
they touch nothing outside it; stopped by the PIDs this module started them with. Clients (sbatch, squeue, and
submitit through Hydra's launcher) reach it through SLURM_CONF in `Cluster.env`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
INSTALL = "apt-get install slurm-wlm munge (Debian or Ubuntu, as root)"
PARTITION = "debug"
READY_S = 60  # slurmd registers within a few seconds; a loaded CI machine gets more
STOP_S = 15
HELD_S = 8  # > KillWait (5 s): the requeued job's previous run has been killed and cleaned up by then


def missing() -> list:
    """The daemons and clients this machine lacks (looked up on PATH and in /usr/sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=path) is None]


def _free_ports(n: int) -> list:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Cluster:
    root: Path
    env: dict  # SLURM_CONF and a PATH with /usr/sbin: what a client adds to its environment to reach this cluster
    socket_dir: Path  # munged's socket: a folder every user may enter (munged refuses pytest's 0700 tmp dirs)
    procs: list = field(default_factory=list)  # the daemons, in start order
    held: dict = field(default_factory=dict)  # requeued job id -> when release_requeued first saw it held

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=60, check=check)

    def jobs(self) -> list:
        """(job id, state, reason) of every job the controller knows and has not purged."""
        out = self.run("squeue", "-h", "-o", "%i|%T|%r").stdout
        return [tuple(line.split("|")) for line in out.splitlines() if line.strip()]

    def wait_for(self, what, timeout_s: float, every_s: float = 0.2, why: str = ""):
        """Poll what() until it returns something truthy; fail the test after timeout_s, with the logs' tails."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = what()
            if got:
                return got
            time.sleep(every_s)
        raise AssertionError(f"SLURM test cluster: {why or 'waited'} for {timeout_s:.0f} s; {self.log_tails()}")

    def release_requeued(self) -> list:
        """A requeued batch job is held until its begin time, two minutes on (SLURM's requeue delay); start it
        once it has been held HELD_S, when its previous run has surely ended (started sooner, slurmd may find
        the old run's credential revoked and kill the new one), so a test does not wait the two minutes out.
        Returns the job ids it moved."""
        now = time.monotonic()
        held = {j for j, state, reason in self.jobs() if state == "PENDING" and reason == "BeginTime"}
        self.held = {j: self.held.get(j, now) for j in held}
        ready = [j for j, since in self.held.items() if now - since >= HELD_S]
        for job in ready:
            self.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        return ready

    def log_tails(self, lines: int = 5) -> str:
        tails = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.is_file():
                tails.append(f"{name}: " + " | ".join(path.read_text().splitlines()[-lines:]))
        return "; ".join(tails)


def _conf(root: Path, sock: Path, ctld_port: int, d_port: int) -> str:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    return "\n".join([
        # addresses given: a CI machine's hostname need not resolve
        "ClusterName=cbamtest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root",
        f"SlurmctldPort={ctld_port}", f"SlurmdPort={d_port}",
        "AuthType=auth/munge", f"AuthInfo=socket={sock}",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        # the cluster: no cgroups or systemd, CPUs as the consumable, no accounting
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "MpiDefault=none", "ReturnToService=2", "KillWait=5",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""])


def start(root: Path) -> Cluster:
    """Write the config, start the three daemons in the foreground (children of this process), wait until the
    node is idle. On any failure, what was started is stopped before the error propagates."""
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    ctld_port, d_port = _free_ports(2)
    conf = root / "slurm.conf"
    socket_dir = Path(tempfile.mkdtemp(prefix="cbam-munge-"))
    socket_dir.chmod(0o755)
    sock = socket_dir / "munge.sock"
    conf.write_text(_conf(root, sock, ctld_port, d_port))
    env = {"SLURM_CONF": str(conf), "PATH": os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])}
    cluster = Cluster(root, env, socket_dir)
    commands = [
        ["munged", "-F", f"--socket={sock}", f"--key-file={key}", f"--pid-file={root}/munged.pid",
         f"--log-file={root}/munged.log", f"--seed-file={root}/munge.seed"],
        ["slurmctld", "-D", "-f", str(conf)],
        ["slurmd", "-D", "-f", str(conf)],
    ]
    try:
        for command in commands:
            out = open(root / f"{command[0]}.out", "w")
            cluster.procs.append(subprocess.Popen(command, env={**os.environ, **env}, stdout=out,
                                                  stderr=subprocess.STDOUT, start_new_session=True))
            if command[0] == "munged":
                cluster.wait_for(lambda: sock.exists() or cluster.procs[0].poll() is not None, READY_S,
                                 why="munged's socket")
                assert cluster.procs[0].poll() is None, (root / "munged.out").read_text()
        cluster.wait_for(lambda: cluster.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() == "idle",
                         READY_S, every_s=0.5, why="the node to be idle")
    except BaseException:
        stop(cluster)
        raise
    return cluster


def stop(cluster: Cluster) -> None:
    """Cancel the cluster's jobs, then stop exactly the daemons start() started (TERM, then KILL)."""
    if cluster.procs and cluster.procs[-1].poll() is None:
        cluster.run("scancel", "--full", "--user", str(os.getuid()), check=False)
        deadline = time.monotonic() + STOP_S
        while time.monotonic() < deadline and cluster.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(0.2)
    for proc in reversed(cluster.procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(cluster.procs):
        try:
            proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    shutil.rmtree(cluster.socket_dir, ignore_errors=True)
