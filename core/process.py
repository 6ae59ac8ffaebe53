"""This process's place in a launch: rank, world size, the main process, the distributed state.

torchrun, ``accelerate launch`` and the DeepSpeed launcher set ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; without them this is the one process of a single-process run. Everything in posttrain
that needs to know reads it here. The distributed state (accelerate's) is created on first use,
before any trainer exists, so that it counts the launcher's processes whatever the device.
"""

from __future__ import annotations

import os


def rank() -> int:
    """This process's rank among all processes (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine (its GPU's index)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """How many processes the launch runs (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True unless this is a non-zero rank of a distributed launch: rank 0 alone writes the run's files."""
    return rank() == 0


def distributed_state():
    """accelerate's state of this process, created once. Without a GPU, accelerate counts a launcher's
    processes as several CPU processes (gloo) only when asked with ``cpu=True``."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    """Wait for every process (nothing to wait for without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def close_process_group() -> None:
    """Tear down the distributed process group of a multi-process run. Left to interpreter exit, its
    communication threads can abort the process ("terminate called without an active exception") after
    a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
