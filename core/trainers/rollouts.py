"""Sampling completions from the policy and scoring them with the reward sources, shared by the stages that
sample outside TRL's trainers (iterative rounds, rejection sampling): which training rows a round uses,
each process's share of them, the samples (seeded) and their rewards gathered in order.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..process import distributed_state
from ..rewards import score
from ..sampling import derive_seed, sample_completions
from ..validate import Plan


def rows_of(dataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]


def round_prompts(train, sampling, round_index: int, seed: int) -> list[dict]:
    """The training rows of a round: a seeded order of the whole set, consecutive slices per round (wrapping
    around when the prompts run out), so rounds see fresh prompts as long as there are enough."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    count = len(order) if sampling.prompts is None else min(sampling.prompts, len(order))
    start = (round_index - 1) * count
    return [train[order[(start + i) % len(order)]] for i in range(count)]


def compute_autocast(precision):
    """A factory of the autocast context for ``precision``'s compute dtype on this process's device."""
    import contextlib

    flags = precision.trl_flags
    if not (flags["bf16"] or flags["fp16"]):
        return contextlib.nullcontext
    dtype = torch.bfloat16 if flags["bf16"] else torch.float16
    return lambda: torch.autocast(distributed_state().device.type, dtype=dtype)


def sample_and_score(plan: Plan, model, tokenizer, rows: list[dict], autocast, seed: int) -> list[dict]:
    """Every row's samples, their combined rewards and each source's (None where it abstained), in
    the order of ``rows``. With several processes each samples and scores every world-size-th row and
    all of them get the whole list, so every process trains on the same pairs and the files rank 0
    writes are what was trained on. ``autocast`` makes a new compute-dtype context per batch (some,
    like accelerate's, are single-use). Each generation batch is sampled with a seed derived from
    ``seed``, the process's rank and the batch's place: the same seed and number of processes give the
    same samples."""
    from accelerate.utils import gather_object

    state = distributed_state()
    world, rank = state.num_processes, state.process_index
    if world == 1:
        return _sample_and_score(plan, model, tokenizer, rows, autocast, seed)
    parts = gather_object([_sample_and_score(plan, model, tokenizer, rows[rank::world], autocast,
                                             derive_seed(seed, "rank", rank))])
    return [parts[i % world][i // world] for i in range(len(rows))]


def _sample_and_score(plan: Plan, model, tokenizer, rows: list[dict], autocast, seed: int) -> list[dict]:
    s = plan.options.sampling
    generation = {"max_new_tokens": s.max_new_tokens, "do_sample": True, "temperature": s.temperature,
                  "top_p": s.top_p}
    out = []
    for start in range(0, len(rows), s.batch_size):
        chunk = rows[start:start + s.batch_size]
        prompts = [r["prompt"] for r in chunk]
        with autocast():
            samples = sample_completions(plan.plugins, model, tokenizer, prompts, s.samples, generation,
                                         seed=derive_seed(seed, "batch", start))
        flat = [text for group in samples.texts for text in group]
        columns = {key: [r[key] for r in chunk for _ in range(s.samples)] for key in chunk[0]}
        rewards = score(plan.plugins, [p for p in prompts for _ in range(s.samples)], flat, columns,
                        [ids for group in samples.ids for ids in group],
                        [cut for group in samples.truncated for cut in group])
        for i, row in enumerate(chunk):
            span = slice(i * s.samples, (i + 1) * s.samples)
            out.append({"row": row, "completions": flat[span], "rewards": rewards.total[span],
                        "by_source": {name: values[span] for name, values in rewards.by_source.items()}})
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".partial")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in records), encoding="utf-8")
    tmp.rename(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
