"""Process-group facts for `accelerate launch` / torchrun jobs; a plain run is rank 0 of 1."""

import os


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


def barrier() -> None:
    """Wait for every process of the job (no-op for one process)."""
    if world_size() > 1:
        from accelerate import PartialState

        init()
        PartialState().wait_for_everyone()
