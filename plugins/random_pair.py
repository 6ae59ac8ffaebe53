"""Pair selection for iterative DPO: a random pair of samples whose rewards differ by more than
``min_gap``, the higher-rewarded one chosen.

For each prompt, the candidate pairs are every two scored samples whose rewards differ by more
than ``min_gap``; one is drawn uniformly (seeded by ``seed``, the round and the prompt, so a
rerun draws the same pairs). No candidate: the prompt is dropped this round.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from posttrain import Plugin, hookimpl


class RandomPair(Plugin):
    name = "random_pair"
    description = "iterative DPO pairs: a random pair of samples whose rewards differ by more than min_gap"

    @dataclass
    class Options:
        min_gap: float = field(default=0.0, metadata={"help": "Only pairs whose rewards differ by more than this."})
        seed: int = field(default=0, metadata={"help": "Seed of the draw (with the prompt's text)."})

        def validate(self):
            if self.min_gap < 0:
                raise ValueError("min_gap must be >= 0")

    def __init__(self, options=None):
        super().__init__(options)
        self.draws = 0  # different draws for the same prompt in later rounds

    @hookimpl
    def posttrain_select_pair(self, prompt, rewards):
        candidates = [(i, j) for i in range(len(rewards)) for j in range(len(rewards))
                      if rewards[i] - rewards[j] > self.options.min_gap]
        self.draws += 1
        if not candidates:
            return None
        key = f"{self.options.seed}|{self.draws}|{prompt}".encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
        return rng.choice(candidates)
