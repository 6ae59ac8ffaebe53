"""Refilling a generation batch of the online stage whose groups some plugin dropped
(``posttrain_filter_groups``): which sampled groups each process trains on, and the batch assembled from
them.

A generation batch holds ``G`` groups of ``g`` consecutive completions per process (every process holds
whole groups); each sampling round produces one such batch and the filter's verdict on every group of it,
gathered (the same on every process). Process ``p``'s groups of a round are the global groups
``p·G … p·G + G − 1``. A process trains on the kept groups of the rounds in the order they were sampled,
the first ``G`` of them; when the rounds ran out first, the dropped groups of the rounds fill the rest, in
the same order. Every process computes every process's choice from the gathered verdicts, so the
assembled gathered rewards need no communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence


@dataclass(frozen=True)
class Pick:
    """One group a process trains on: the round that sampled it, its index among the process's groups of
    that round, and whether the filter kept it."""

    round: int
    group: int
    kept: bool


def kept_counts(verdicts: list[list[bool]], processes: int) -> list[int]:
    """Per process, how many groups the rounds so far kept (``verdicts``: per round, one bool per group of
    the gathered batch)."""
    per_process = len(verdicts[0]) // processes
    return [sum(sum(v[p * per_process:(p + 1) * per_process]) for v in verdicts) for p in range(processes)]


def short(verdicts: list[list[bool]], processes: int) -> bool:
    """Whether some process has fewer kept groups than its share of the batch."""
    per_process = len(verdicts[0]) // processes
    return min(kept_counts(verdicts, processes)) < per_process


def picks(verdicts: list[list[bool]], processes: int) -> list[list[Pick]]:
    """Per process, the groups it trains on, in order (see the module's docstring)."""
    per_process = len(verdicts[0]) // processes
    chosen = []
    for p in range(processes):
        groups = [Pick(r, j, v[p * per_process + j]) for r, v in enumerate(verdicts) for j in range(per_process)]
        ordered = [pick for pick in groups if pick.kept] + [pick for pick in groups if not pick.kept]
        chosen.append(ordered[:per_process])
    return chosen


def gathered_rows(chosen: list[list[Pick]], group_size: int, per_process: int) -> list[tuple[int, int]]:
    """The rows of the assembled gathered batch, as (round, row of that round's gathered batch), process by
    process."""
    rows = []
    for p, groups in enumerate(chosen):
        for pick in groups:
            start = (p * per_process + pick.group) * group_size
            rows.extend((pick.round, start + i) for i in range(group_size))
    return rows


# How each tensor of GRPOTrainer's generation output is padded when rows of rounds of different lengths are
# put together: (side, value); None: the tokenizer's pad id.
_PADDING = {
    "prompt_ids": ("left", None),
    "prompt_mask": ("left", 0),
    "completion_ids": ("right", None),
    "completion_mask": ("right", 0),
    "old_per_token_logps": ("right", 0.0),
    "ref_per_token_logps": ("right", 0.0),
    "sampling_per_token_logps": ("right", 0.0),
    "importance_sampling_ratio": ("right", 1.0),
    "tool_mask": ("right", 1),
}
_RECOMPUTED = ("advantages", "num_items_in_batch")  # set by the caller for the assembled batch


def unsupported_keys(output: dict) -> list[str]:
    """Keys of a generation output this module cannot assemble (images and other model inputs)."""
    return sorted(k for k in output if k not in _PADDING and k not in _RECOMPUTED)


def assemble(outputs: list[dict], chosen: list[Pick], group_size: int, pad_id: int) -> dict:
    """This process's generation output made of its chosen groups: each tensor's rows taken from the rounds'
    outputs and padded to the longest (prompts on the left, completions on the right)."""
    merged = {}
    for key, (side, value) in _PADDING.items():
        if key not in outputs[0]:
            continue
        rows = []
        for pick in chosen:
            tensor = outputs[pick.round][key]
            rows.extend(tensor[pick.group * group_size + i] for i in range(group_size))
        fill = pad_id if value is None else value
        if rows[0].dim() == 0:
            merged[key] = torch.stack(rows)
        elif side == "left":
            merged[key] = pad_sequence([r.flip(0) for r in rows], batch_first=True, padding_value=fill).flip(1)
        else:
            merged[key] = pad_sequence(rows, batch_first=True, padding_value=fill)
    return merged


def local_items(items: list[list], chosen: list[Pick], group_size: int) -> list:
    """This process's per-row values (prompts, completions) of its chosen groups, from each round's list."""
    return [items[pick.round][pick.group * group_size + i] for pick in chosen for i in range(group_size)]
