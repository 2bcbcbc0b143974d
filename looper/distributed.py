"""Process-group facts for `accelerate launch` / torchrun jobs (a plain run is rank 0 of 1), and GPU claiming for
sweep jobs that run side by side."""

import fcntl
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def world_size() -> int:
    """Processes in this job."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's index in the job."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 (or a plain single process)."""
    return rank() == 0


def init() -> None:
    """Join the process group of a multi-process launch. Without CUDA, accelerate treats the job as distributed only
    when its (shared, first-created) state is made with `cpu=True`; trainers created later reuse this state."""
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


_BARRIER_GROUP = None


def barrier() -> None:
    """Wait for every process of the job (no-op for one process). looper's barriers use a process group of their
    own, so that collectives a trainer issues on the default group can never pair with them out of order."""
    global _BARRIER_GROUP
    if world_size() > 1:
        import torch.distributed as dist

        init()
        if _BARRIER_GROUP is None:  # every rank reaches its first barrier on the same code path
            _BARRIER_GROUP = dist.new_group(backend="gloo")
        dist.barrier(group=_BARRIER_GROUP)


@contextmanager
def claim_gpu(lock_dir: Path, enabled: bool = True):
    """Pin this process to a GPU no other job holds (a file lock per GPU), so that parallel sweep jobs (the joblib
    launcher) each get their own; waits while all are taken. A no-op with fewer than two GPUs or under a
    multi-process launch, where accelerate assigns devices."""
    import torch

    if not enabled or world_size() > 1 or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        yield None
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(torch.cuda.device_count()):
            handle = open(lock_dir / f"gpu{index}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            torch.cuda.set_device(index)
            log.info("this job runs on GPU %d", index)
            try:
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(5)
