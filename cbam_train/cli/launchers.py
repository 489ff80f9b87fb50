"""Jobs started by Hydra's launcher plugins. A submitit job with several tasks (SLURM's
`hydra.launcher.tasks_per_node=N` / `nodes=M`, or submitit_local's) runs one process per task but sets only
submitit's variables; the run reads torchrun's (distributed.from_env), so each task gets them here, before
the run starts. Under torchrun, or in a single-task job, nothing changes."""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional

# MASTER_PORT from the job's own id (SLURM_JOB_ID: unique per array task), so the tasks of one job agree without
# talking; below Linux's ephemeral range (32768-60999), where outgoing connections take their ports
PORT_BASE, PORT_SPAN = 15000, 15000


def submitit_ranks(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """torchrun's variables for this task of a multi-task submitit job ({} when there is nothing to set)."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" in environ or not environ.get("SUBMITIT_EXECUTOR"):
        return {}
    import submitit  # present: the job was started by it

    job = submitit.JobEnvironment()
    if job.num_tasks <= 1:
        return {}
    digits = re.sub(r"\D", "", str(job.raw_job_id)) or "0"
    return {"RANK": str(job.global_rank), "LOCAL_RANK": str(job.local_rank), "WORLD_SIZE": str(job.num_tasks),
            "LOCAL_WORLD_SIZE": str(job.num_tasks // max(1, job.num_nodes)),
            "MASTER_ADDR": "127.0.0.1" if job.num_nodes == 1 else job.hostnames[0],
            "MASTER_PORT": environ.get("MASTER_PORT") or str(PORT_BASE + int(digits) % PORT_SPAN)}


def is_main_process(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Rank 0, or the only process: the one that records a sweep job's status."""
    environ = os.environ if environ is None else environ
    return int(environ.get("RANK", "0")) == 0
