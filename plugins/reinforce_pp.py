"""REINFORCE++ (Hu 2025, OpenRLHF's ``reinforce`` and ``reinforce_baseline`` estimators): critic-free
per-token advantages, the KL penalty in the return, normalised over the whole batch.

For each completion, token t = 0..L-1 (L its length; the rest is padding):

    R'    = R                                   REINFORCE++
            R − mean_{j in group} R_j           ``baseline: true`` (REINFORCE++-baseline)
    r_t   = −β·KL_t + (R' at t = L-1)           the KL penalty, folded into the reward ("kl: reward")
    KL_t  = log π(y_t) − log π_ref(y_t)         k1; ``kl_estimator: k2`` or ``k3`` (``gae.kl_terms``)
    G_t   = Σ_{s ≥ t} r_s                        the return (no discount)
    A_t   = (G_t − mean(G)) / (std(G) + ε)      over every completion token of the batch, all processes

R is the sequence's reward from the reward sources (NaN rows, which no source scored, are left out of
the group means and of the batch statistics, and get advantage 0), log π the policy's log-probs at
sampling time, log π_ref the reference's (present when ``training.beta`` > 0), β = ``training.beta``,
std the sample standard deviation and ε = 1e-4. The normalisation over the global batch instead of
per prompt is what sets REINFORCE++ apart from GRPO. ``kl: loss`` leaves the reward alone and TRL adds
β·KL to the loss instead (OpenRLHF's ``--use_kl_loss``, common with the baseline form). PPO's clipped
loss is TRL's, as for every advantage estimator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain import Advantages, Plugin, UserError, hookimpl
from posttrain.plugins.advantage_norm import whiten_tokens
from posttrain.plugins.gae import KL_ESTIMATOR_HELP, check_kl_estimator, per_token_rewards


def returns(token_rewards, mask):
    """(n, T) undiscounted returns G_t = Σ_{s≥t} r_s over each row's completion tokens (0 on padding)."""
    import torch

    mask = mask.to(token_rewards.dtype)
    return torch.flip(torch.cumsum(torch.flip(token_rewards * mask, dims=[1]), dim=1), dims=[1]) * mask


class ReinforcePP(Plugin):
    name = "reinforce_pp"
    description = ("advantage estimate (online): REINFORCE++, per-token returns with the KL in the reward, "
                   "whitened over the batch; baseline: subtract the group mean first")
    stages = ("online",)
    reads_per_token_logps = True

    @dataclass
    class Options:
        baseline: bool = field(default=False, metadata={
            "help": "Subtract each prompt's group mean reward first (REINFORCE++-baseline)."})
        kl: Literal["reward", "loss"] = field(default="reward", metadata={
            "help": "'reward': β·(log π − log π_ref) is part of each token's reward and TRL's in-loss KL is off; "
                    "'loss': TRL adds β·KL to the loss."})
        kl_estimator: Literal["k1", "k2", "k3"] = field(default="k1", metadata={"help": KL_ESTIMATOR_HELP})

    @hookimpl
    def posttrain_trl_config(self, stage, recipe):
        """Refuses the baseline form when each prompt has one completion (its group mean is the reward), and a
        kl_estimator that cannot act."""
        generations = (recipe.get("training") or {}).get("num_generations")
        if self.options.baseline and generations == 1:
            raise UserError("reinforce_pp's baseline subtracts each prompt's mean reward, and with one completion "
                            "per prompt every advantage would be 0", field="plugins.reinforce_pp.baseline",
                            fix="set training.num_generations to 2 or more, or baseline: false")
        check_kl_estimator(self.name, self.options.kl, recipe)
        return None

    @hookimpl
    def posttrain_advantage_estimate(self, rollouts):
        import torch

        rewards = rollouts.rewards
        if self.options.baseline:
            grouped = rollouts.grouped_rewards
            rewards = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).reshape(-1)
        local = rewards[rollouts.local]
        kl_in_reward = self.options.kl == "reward"
        token_rewards = per_token_rewards(local, rollouts.completion_mask, rollouts.logps, rollouts.ref_logps,
                                          rollouts.kl_coef if kl_in_reward else 0.0, self.options.kl_estimator)
        g = returns(token_rewards, rollouts.completion_mask)
        g[local.isnan()] = float("nan")  # no reward: out of the statistics, advantage 0 after the transforms
        return Advantages(whiten_tokens(g, rollouts), kl_in_reward=kl_in_reward)
