"""This process's place in a launch: rank, world size, the main process, the distributed state.

torchrun, ``accelerate launch`` and the DeepSpeed launcher set ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; without them this is the one process of a single-process run. Everything in posttrain
that needs to know reads it here. The distributed state (accelerate's) is created on first use,
before any trainer exists, so that it counts the launcher's processes whatever the device. What the
main process alone decides reaches the others through :func:`on_main`, errors included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


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


def fsdp_requested(trl_configs) -> str | None:
    """Where a run asks for FSDP: the launcher (``accelerate launch --use_fsdp``) or a stage's ``training.fsdp``
    / ``training.fsdp_config``; None when nothing does."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1", "yes"):
        return "accelerate launch --use_fsdp"
    for config in trl_configs:
        for key in ("fsdp", "fsdp_config"):
            if config.get(key):
                return f"training.{key}"
    return None


def check_fsdp_device(where: str | None) -> None:
    """FSDP through accelerate runs on GPUs (and other accelerators) only: on CPU processes accelerate runs
    the launch as plain data parallel without saying so, every process holding the whole model. A run that
    asks for FSDP there is refused before any model loads, so nobody takes DDP numbers for FSDP's."""
    if where is None:
        return
    import torch

    if torch.cuda.is_available():
        return
    from .errors import UserError

    raise UserError("FSDP was asked for, and this machine has no GPU: accelerate runs CPU processes as plain data "
                    "parallel (every process holding the whole model), not FSDP", field=where,
                    fix="on CPU processes shard with DeepSpeed ZeRO-3 instead (training.deepspeed with "
                        "zero_optimization.stage 3, launched with accelerate launch --use_deepspeed); or run on GPUs")


def setup_distributed(deepspeed: bool = False) -> None:
    """Set up the distributed state once, from the launcher's environment, before any model is loaded.

    A launch's processes must be counted before the first model: DeepSpeed ZeRO-3 builds each model
    already sharded (``deepspeed.zero.Init`` inside ``from_pretrained``) and checks its batch arithmetic
    against the number of processes its own communication layer knows. accelerate initialises that layer
    for DeepSpeed on GPUs only; on CPU processes (gloo) it would see one process. Without a launcher this
    does nothing."""
    if "LOCAL_RANK" not in os.environ and world_size() <= 1:
        return
    state = distributed_state()
    if not deepspeed:
        return
    from deepspeed import comm

    if not comm.is_initialized():  # wraps the process group accelerate created (no second rendezvous)
        comm.init_distributed(dist_backend=state.backend, auto_mpi_discovery=False)


def barrier() -> None:
    """Wait for every process (nothing to wait for without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


_object_group: dict = {}  # the process group on_main broadcasts over (gloo), once created


def _broadcast_group():
    """A gloo group for Python objects: the default group when it is gloo (CPU processes), else one gloo group
    over the same processes, created once (every rank reaches on_main at the same points, as creating it asks)."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    if "group" not in _object_group:
        _object_group["group"] = dist.new_group(backend="gloo")
    return _object_group["group"]


def on_main(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run by the main process alone, its outcome shared by every process.

    What rank 0 alone decides (the run directory: new, resumed, replaced, finished, a changed recipe; the merged
    output; lm-eval's benchmarks) is agreed on here. Every process waits for rank 0 and returns what ``fn``
    returned there, or raises the user error it raised: the same message, exit status 2, on every rank, and no
    rank goes on alone into training to die on a closed connection. Any other exception is raised on rank 0 as
    it is, and the other ranks stop with an error naming it. Without a process group ``fn`` simply runs."""
    import torch.distributed as dist

    from .errors import UserError

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn(*args, **kwargs)
    outcome: list = [None]
    error = None
    if is_main():
        try:
            outcome[0] = ("value", fn(*args, **kwargs))
        except UserError as e:
            error, outcome[0] = e, ("user", (e.message, e.field, e.fix, e.keep_run_dir))
        except BaseException as e:
            error, outcome[0] = e, ("other", f"{type(e).__name__}: {e}")
    group = _broadcast_group()
    dist.broadcast_object_list(outcome, src=0, group=group)
    kind, payload = outcome[0]
    if kind == "value":
        return payload
    dist.barrier(group=group)  # every rank holds the verdict before any of them exits
    if error is not None:
        raise error
    if kind == "user":
        message, field, fix, keep = payload
        agreed = UserError(message, field=field, fix=fix)
        agreed.keep_run_dir = keep
        raise agreed
    raise RuntimeError(f"the main process (rank 0) failed: {payload}")


def close_process_group() -> None:
    """Tear down the distributed process group of a multi-process run. Left to interpreter exit, its
    communication threads can abort the process ("terminate called without an active exception") after
    a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -- stopping cleanly: preemption (SIGTERM) and Ctrl-C (SIGINT) ---------------------------------------

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on a signal after saving; `--resume` continues (a scheduler may requeue)
_stop: dict = {"signal": None}


@contextlib.contextmanager
def stop_handlers():
    """While a run runs: the first SIGTERM or SIGINT asks it to stop cleanly (the current optimizer step
    finishes, a checkpoint is saved, the process exits with PREEMPTED_EXIT); a second one stops at once
    (SIGTERM: the default action; SIGINT: KeyboardInterrupt). The previous handlers come back on exit.
    Only the main thread can install handlers (elsewhere this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    reset_stop()
    for sig in previous:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _on_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _stop["signal"] is not None:  # the second one: at once
        signal.signal(signum, signal.SIG_DFL)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)
        return
    _stop["signal"] = name
    sys.stderr.write(f"posttrain: {name} received (rank {rank()}): finishing the current step, saving a checkpoint, "
                     f"then stopping; send it again to stop at once\n")
    sys.stderr.flush()


def stop_requested() -> str | None:
    """The signal that asked this process to stop, or None."""
    return _stop["signal"]


def reset_stop() -> None:
    _stop["signal"] = None


def stop_agreed(device=None) -> bool:
    """Whether any process was asked to stop: every rank calls this at the same point (the end of each
    optimizer step) and gets the same answer, so all of them stop after the same step."""
    asked = stop_requested() is not None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return asked
    import torch

    flag = torch.tensor([1.0 if asked else 0.0], device=device if device is not None else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and not asked:
        _stop["signal"] = "another process's signal"
    return bool(flag.item())


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint (not an error: ``--resume`` continues it)."""

    def __init__(self, stage: str, step: int, checkpoint, run_dir, signal_name: str):
        self.stage, self.step, self.checkpoint, self.run_dir, self.signal_name = (stage, step, checkpoint, run_dir,
                                                                                   signal_name)
        super().__init__(f"stopped on {signal_name} in the {stage} stage after step {step}; checkpoint "
                         f"{checkpoint}")
