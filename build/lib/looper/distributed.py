"""Process-group facts for `accelerate launch` / torchrun jobs (a plain run is rank 0 of 1), and one GPU per
single-process job (parallel sweep jobs each get their own)."""

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


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them; counted through NVML when it is unset, so
    CUDA does not start (once it has, CUDA_VISIBLE_DEVICES no longer applies)."""
    names = os.environ.get("CUDA_VISIBLE_DEVICES")
    if names is not None:
        return [name.strip() for name in names.split(",") if name.strip()]
    import torch

    count = torch.cuda._device_count_nvml() if hasattr(torch.cuda, "_device_count_nvml") else -1
    return [str(i) for i in range(count)] if count > 0 else []


@contextmanager
def claim_gpu(lock_dir: Path):
    """Give this single-process job one GPU that no other looper job holds: a file lock per GPU (waiting while all
    are taken), and CUDA_VISIBLE_DEVICES narrowed to it, which must happen before CUDA starts. With several GPUs
    visible, transformers' Trainer would wrap the model in nn.DataParallel (which TRL refuses) on cuda:0, whichever
    GPU was current; jobs that should use several GPUs run under `accelerate launch`, one process per GPU. A process
    that was pinned before (a reused joblib worker) keeps its GPU and waits for its lock. A no-op with fewer than two
    GPUs or under a multi-process launch."""
    pinned = os.environ.get("LOOPER_PINNED_GPU")
    gpus = [pinned] if pinned is not None else visible_gpus()
    if world_size() > 1 or (pinned is None and len(gpus) < 2):
        yield None
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for name in gpus:
            handle = open(lock_dir / f"gpu{''.join(c if c.isalnum() else '_' for c in name)}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["LOOPER_PINNED_GPU"] = name
            log.info("this job runs on GPU %s", name)
            try:
                yield name
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(5)
