"""Group-relative advantages (GRPO's baseline): each completion's reward minus the mean reward of
the completions sampled for the same prompt.

    A_i = r_i − mean_{j in group(i)} r_j

Unscorable completions (every reward source abstained) are left out of the group mean and get
advantage 0. Scaling by the group's standard deviation (GRPO's default in TRL) is not part of the
estimate: add ``advantage_norm`` with ``scope: group`` for that, or ``scope: batch`` for PPO-style
whitening over the whole batch. Alone, this is the unscaled estimator of Dr. GRPO.
"""

from __future__ import annotations

from posttrain import Plugin, hookimpl


class GroupRelative(Plugin):
    name = "group_relative"
    description = "advantage = reward − mean reward of the prompt's group (GRPO; owns the advantage estimate)"

    @hookimpl
    def posttrain_advantage_estimate(self, rollouts):
        import torch

        grouped = rollouts.grouped_rewards
        return (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).reshape(-1)
