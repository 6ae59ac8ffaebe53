"""Advantage normalisation: whiten advantages before the loss, over the whole batch or per prompt
group. The first of the three PPO factors the study *Is DPO Superior to PPO for LLM Alignment?*
found decisive.

    scope: batch   A ← (A − mean(A)) / (std(A) + ε)   over every completion of the generation batch,
                   gathered from all processes (PPO's whitening; RLOO's normalize_advantages)
    scope: group   A ← (A − mean_g(A)) / (std_g(A) + ε) within each prompt's group (with
                   group_relative, this is GRPO's scale_rewards="group")

std is the sample standard deviation, ε = 1e-4 (TRL's). With ``center: false`` the mean is not
subtracted (scaling only). Unscorable completions (NaN) are left out of the statistics. Per-token
advantages (from a value-model estimator) are whitened over the unmasked tokens of the batch, all
processes included (NaN rows, which no reward source scored, are left out and stay NaN);
``scope: group`` needs per-sequence advantages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain import Plugin, UserError, hookimpl

EPSILON = 1e-4


def whiten_tokens(advantages, rollouts, center: bool = True):
    """(n, T) per-token advantages whitened over the completion tokens of the whole batch, all processes
    included: (A − mean) / (std + ε), std the sample standard deviation. NaN rows (no reward source scored
    them) are left out of the statistics and stay NaN; padding becomes 0."""
    import torch

    mask = (rollouts.completion_mask.bool() & ~torch.isnan(advantages)).to(advantages.dtype)
    values = torch.nan_to_num(advantages, nan=0.0)
    local = torch.stack([(values * mask).sum(), (values ** 2 * mask).sum(), mask.sum()])
    total, total_sq, count = rollouts.gather(local.unsqueeze(0)).sum(dim=0)
    mean = total / count.clamp(min=1)
    std = ((total_sq - count * mean ** 2) / (count - 1).clamp(min=1)).clamp(min=0).sqrt()
    centred = advantages - mean if center else advantages
    return centred / (std + EPSILON) * rollouts.completion_mask.to(advantages.dtype)


class AdvantageNorm(Plugin):
    name = "advantage_norm"
    description = "whitens advantages over the batch (PPO) or within each prompt's group (GRPO)"

    @dataclass
    class Options:
        scope: Literal["batch", "group"] = field(default="batch", metadata={
            "help": "'batch': statistics over the whole gathered batch; 'group': within each prompt's completions."})
        center: bool = field(default=True, metadata={"help": "Subtract the mean (false: only divide by the std)."})

    @hookimpl
    def posttrain_advantage_transform(self, advantages, rollouts):
        import torch

        if advantages.dim() == 2:
            if self.options.scope == "group":
                raise UserError("scope 'group' needs one advantage per completion, but the estimator gives one "
                                "per token", field="plugins.advantage_norm.scope", fix="use scope: batch")
            return whiten_tokens(advantages, rollouts, self.options.center)
        values = advantages.view(-1, rollouts.group_size) if self.options.scope == "group" else advantages.view(1, -1)
        valid = ~torch.isnan(values)
        count = valid.sum(dim=1, keepdim=True)
        mean = torch.nanmean(values, dim=1, keepdim=True)
        var = torch.nansum((values - mean) ** 2, dim=1, keepdim=True) / (count - 1).clamp(min=1)
        std = var.sqrt()
        centred = values - mean if self.options.center else values
        return (centred / (std + EPSILON)).reshape(-1)
