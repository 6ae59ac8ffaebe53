"""Leave-one-out advantages (RLOO): each completion's reward minus the mean reward of the *other*
completions sampled for the same prompt.

    A_i = r_i − 1/(k−1) · Σ_{j in group(i), j≠i} r_j      (k scorable completions in the group)

An unbiased baseline: it does not use the completion's own reward. Unscorable completions are left
out of their siblings' baselines and get advantage 0, as does a completion with no scorable
sibling. Equal to TRL's RLOOTrainer advantages (tested), whose ``normalize_advantages`` is
``advantage_norm`` with ``scope: batch``.
"""

from __future__ import annotations

from posttrain import Plugin, hookimpl


class LeaveOneOut(Plugin):
    name = "leave_one_out"
    description = "advantage = reward − mean reward of the other completions of the prompt (RLOO; owns the estimate)"

    @hookimpl
    def posttrain_advantage_estimate(self, rollouts):
        import torch

        grouped = rollouts.grouped_rewards
        scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        others = torch.nansum(grouped, dim=1, keepdim=True) - grouped
        baseline = others / (scorable - 1)  # 0/0 = NaN for a lone scorable completion: advantage 0
        return (grouped - baseline).reshape(-1)
