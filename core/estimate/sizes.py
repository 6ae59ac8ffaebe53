"""The command line's sizes: GPU memory (``--gpu-memory``: '24GB', '24GiB', '80G', '24', '40960MiB') and the
number of processes (``--processes``, by default the launcher's WORLD_SIZE, else 1)."""

from __future__ import annotations

import re

from ..errors import UserError
from ..process import world_size
from .constants import GiB

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*$", re.IGNORECASE)


def parse_gpu_memory(text: str) -> float:
    """GPU memory in bytes from '24GB', '24GiB', '80G', '24' (GiB), '40960MiB'.

    A GPU sold as '24 GB' has 24 GiB, so GB and GiB mean the same here (and M/MB/MiB, T/TB/TiB)."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"cannot read '{text}' as an amount of GPU memory", field="--gpu-memory",
                        fix="write a positive size such as 24GB, 24GiB, 80G or 24 (GiB)")
    unit = (match.group(2) or "g").lower()[0]
    return float(match.group(1)) * {"m": 2 ** 20, "g": GiB, "t": 2 ** 40}[unit]


def processes_default() -> int:
    """The processes of the run being launched (WORLD_SIZE), else 1."""
    try:
        return max(1, world_size())
    except ValueError:
        return 1


def parse_processes(text) -> int:
    """``--processes``: a positive number, or :func:`processes_default` when not given."""
    if text is None:
        return processes_default()
    try:
        value = int(str(text))
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"cannot read '{text}' as a number of processes", field="--processes",
                        fix="give the number of GPUs the run uses, e.g. --processes 8")
    return value
