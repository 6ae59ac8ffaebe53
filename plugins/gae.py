"""Generalised advantage estimation (GAE) from a learned critic: PPO's advantage, per token.

For each completion, token t = 0..L-1 (L its length; the rest is padding):

    r_t   = -β·KL_t                                    the KL penalty, folded into the reward ("kl: reward")
            + R   at t = L-1                            the sequence's reward from the reward sources
    KL_t  = log π(y_t) - log π_ref(y_t)                k1; ``kl_estimator: k2`` or ``k3`` (:func:`kl_terms`)
    δ_t   = r_t + γ·V_{t+1} - V_t                       with V_L = 0 (the episode ends with the completion)
    A_t   = Σ_{k≥0} (γλ)^k · δ_{t+k}                   computed backwards: A_t = δ_t + γλ·A_{t+1}
    G_t   = A_t + V_t                                    the value targets the critic learns

V_t = V(x, y_<t) is the critic's value of the state before token t (``rollouts.values``, from the
``critic`` plugin), log π the policy's log-probs at sampling time (``rollouts.logps``), log π_ref the
reference's (``rollouts.ref_logps``, present when ``training.beta`` > 0) and β = ``training.beta``.

``kl: reward`` (the default; the DPO-vs-PPO study, InstructGPT) puts the KL in the reward as above
and takes it out of TRL's loss; ``kl: loss`` leaves the reward alone and TRL adds β·KL to the loss
(GRPO's way). With λ = 1 and γ = 1 the advantages are the returns minus the values; with a zero critic
they are the KL-shaped returns. A completion no reward source scored gets advantage 0 and no target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain import Advantages, Plugin, UserError, hookimpl


KL_ESTIMATORS = ("k1", "k2", "k3")
KL_ESTIMATOR_HELP = ("The per-token KL estimate folded into the reward: k1 = log π − log π_ref, k2 = ½(log r)², "
                     "k3 = (r − 1) − log r with r = π_ref/π (Schulman).")


def check_kl_estimator(name: str, kl: str, recipe: dict) -> None:
    """Refuse a ``kl_estimator`` the recipe sets where it cannot act: without a KL penalty (``training.beta``
    0, TRL's default) or with the KL in the loss (TRL's own term, always k3)."""
    options = ((recipe.get("plugins") or {}).get(name)) or {}
    if "kl_estimator" not in options:
        return
    beta = (recipe.get("training") or {}).get("beta") or 0.0
    if kl == "loss":
        raise UserError(f"{name}'s kl_estimator chooses the KL folded into the reward, and kl: loss leaves the KL to "
                        "TRL's loss term (its own k3 estimate)", field=f"plugins.{name}.kl_estimator",
                        fix="remove kl_estimator, or set kl: reward")
    if not beta:
        raise UserError(f"{name}'s kl_estimator has no KL penalty to estimate: training.beta is {beta}",
                        field=f"plugins.{name}.kl_estimator",
                        fix="set training.beta > 0 (the KL penalty's weight, e.g. 0.01), or remove kl_estimator")


def kl_terms(logps, ref_logps, estimator: str = "k1"):
    """Per-token estimates of KL(π ‖ π_ref) from tokens sampled from π (Schulman, "Approximating KL
    divergence"), with log r = log π_ref(y_t) − log π(y_t):

        k1 = −log r                 unbiased, high variance, can be negative
        k2 = ½ (log r)²             biased, low variance, never negative
        k3 = (r − 1) − log r        unbiased, low variance, never negative (TRL's in-loss KL)
    """
    import torch

    log_r = ref_logps - logps
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r} (one of {', '.join(KL_ESTIMATORS)})")


def per_token_rewards(rewards, mask, logps=None, ref_logps=None, kl_coef: float = 0.0, estimator: str = "k1"):
    """(n, T) rewards: -β·KL_t on every completion token (KL_t the chosen estimator, k1 = log π - log π_ref),
    plus each sequence's reward on its last token. NaN rewards (unscored completions) become 0."""
    import torch

    mask = mask.to(torch.float32)
    out = torch.zeros_like(mask)
    if kl_coef and logps is not None and ref_logps is not None:
        out = out - kl_coef * kl_terms(logps, ref_logps, estimator) * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rows = torch.arange(mask.shape[0], device=mask.device)
    has_tokens = mask.sum(dim=1) > 0
    out[rows[has_tokens], last[has_tokens]] += torch.nan_to_num(rewards.to(out.dtype), nan=0.0)[has_tokens]
    return out


def gae(token_rewards, values, mask, gamma: float, lam: float):
    """Advantages and value targets, (n, T) each, by the backward recursion above (0 on padding)."""
    import torch

    mask = mask.to(token_rewards.dtype)
    values = values.to(token_rewards.dtype) * mask
    advantages = torch.zeros_like(token_rewards)
    running = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype, device=token_rewards.device)
    steps = token_rewards.shape[1]
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


class GAE(Plugin):
    name = "gae"
    description = "PPO's advantages: GAE(γ, λ) over per-token rewards (KL in the reward) from a learned critic"
    needs = ("posttrain_critic",)  # a critic provides rollouts.values
    provides = ("value_targets",)  # and learns the value targets returned here

    @dataclass
    class Options:
        gamma: float = field(default=1.0, metadata={"help": "Discount γ over completion tokens."})
        lam: float = field(default=0.95, metadata={"help": "GAE λ: 1 is Monte-Carlo returns minus values, 0 is TD(0)."})
        kl: Literal["reward", "loss"] = field(default="reward", metadata={
            "help": "'reward': the KL penalty β·(log π − log π_ref) is part of the per-token reward and TRL's in-loss "
                    "KL is off (PPO, the study); 'loss': TRL adds β·KL to the loss (GRPO's way)."})
        kl_estimator: Literal["k1", "k2", "k3"] = field(default="k1", metadata={"help": KL_ESTIMATOR_HELP})

        def validate(self):
            if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
                raise ValueError("gamma and lam must be in [0, 1]")

    @hookimpl
    def posttrain_trl_config(self, stage, recipe):
        """Refuses a kl_estimator that cannot act (nothing is set)."""
        check_kl_estimator(self.name, self.options.kl, recipe)
        return None

    @hookimpl
    def posttrain_advantage_estimate(self, rollouts):
        if rollouts.values is None:
            raise UserError("gae needs the critic's values: enable the `critic` plugin", field="plugins.gae",
                            fix="add `critic: {}` (a LoRA critic on the policy's base) or `critic: {model: ...}`")
        kl_in_reward = self.options.kl == "reward"
        rewards = rollouts.rewards[rollouts.local]
        token_rewards = per_token_rewards(rewards, rollouts.completion_mask, rollouts.logps, rollouts.ref_logps,
                                          rollouts.kl_coef if kl_in_reward else 0.0, self.options.kl_estimator)
        advantages, targets = gae(token_rewards, rollouts.values, rollouts.completion_mask, self.options.gamma,
                                  self.options.lam)
        unscored = rewards.isnan()
        advantages[unscored] = float("nan")  # no reward: advantage 0 after the transforms, and no value target
        targets[unscored] = float("nan")
        return Advantages(advantages, value_targets=targets, kl_in_reward=kl_in_reward)
