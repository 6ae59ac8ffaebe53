"""DAPO's dynamic sampling: a group of completions of one prompt whose rewards are all equal (every answer
right, or every answer wrong) has a group-relative advantage of 0 for every completion and gives the update
no signal. This plugin drops such groups and has the online stage sample more prompts in their place, so
every update trains on its full batch of groups that carry signal.

A group is kept when the standard deviation of its completions' rewards (population, over the completions
some source scored) is above ``min_std``; a group no source scored is dropped. The stage samples at most
``max_rounds`` extra batches per generation batch (DAPO's ``max_num_gen_batches``); a batch still short
after them is filled up with dropped groups (counted as ``filter_groups/filled_with_dropped``). Each step's
``filter_groups/kept``, ``/dropped``, ``/rounds`` and ``/extra_completions`` are in metrics.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import GroupFilter, Plugin, hookimpl


def signal_groups(grouped_rewards, min_std: float) -> list[bool]:
    """Per group (rows of ``grouped_rewards``, NaN where no source scored), whether its scored rewards
    spread more than ``min_std`` (population standard deviation); a group with fewer than two scored
    completions has no spread."""
    import torch

    keep = []
    for row in grouped_rewards:
        scored = row[~torch.isnan(row)].double()
        spread = scored.std(unbiased=False).item() if scored.numel() >= 2 else 0.0
        keep.append(spread > min_std)
    return keep


class DynamicSampling(Plugin):
    name = "dynamic_sampling"
    description = ("group filter (online): drop groups whose completions all got the same reward and sample more "
                   "prompts in their place (DAPO's dynamic sampling)")
    stages = ("online",)

    @dataclass
    class Options:
        max_rounds: int = field(default=4, metadata={
            "help": "Extra sampling rounds per generation batch at most (DAPO's max_num_gen_batches); after them "
                    "the batch is filled up with dropped groups. 0: drop nothing, only count."})
        min_std: float = field(default=0.0, metadata={
            "help": "A group is kept when the standard deviation of its rewards is above this."})

        def validate(self):
            if self.max_rounds < 0:
                raise ValueError("max_rounds must be 0 or more")
            if self.min_std < 0:
                raise ValueError("min_std must be 0 or more")

    @hookimpl
    def posttrain_filter_groups(self, rollouts):
        return GroupFilter(keep=signal_groups(rollouts.grouped_rewards, self.options.min_std),
                           max_rounds=self.options.max_rounds)
