"""Pair selection for iterative DPO: the best-scored sample against the worst.

For each prompt of a round, among the samples the reward sources scored: chosen = the highest
reward, rejected = the lowest (the first one of each in sampling order when several tie). The pair
is dropped when the gap is at most ``min_gap`` (by default: when the best and the worst tie). This
is what the core does when no pair-selection plugin is enabled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import Plugin, hookimpl
from posttrain.pairs import best_and_worst


class BestVsWorst(Plugin):
    name = "best_vs_worst"
    description = "iterative DPO pairs: each prompt's best-scored sample against its worst (gap above min_gap)"

    @dataclass
    class Options:
        min_gap: float = field(default=0.0, metadata={
            "help": "Drop the prompt when best − worst reward is at most this (0: drop ties only)."})

        def validate(self):
            if self.min_gap < 0:
                raise ValueError("min_gap must be >= 0")

    @hookimpl
    def posttrain_select_pair(self, rewards):
        return best_and_worst(rewards, self.options.min_gap)
