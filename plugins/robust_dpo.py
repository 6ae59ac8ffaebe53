"""DPO for noisy labels: each preference label is flipped with probability ε.

Two estimators of the DPO loss under flipped labels, with h the log-ratio margin and β the
DPO temperature:

- ``robust`` (Chowdhury et al., 2024), unbiased for the clean loss:
  L = [ -(1-ε) log σ(βh) + ε log σ(-βh) ] / (1 - 2ε)            (TRL's ``loss_type="robust"``)
- ``conservative`` (cDPO, Mitchell 2023), label smoothing:
  L = -(1-ε) log σ(βh) - ε log σ(-βh)

ε = 0 gives DPO in both cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain import Plugin, PreferenceLoss, hookimpl


class RobustDPO(Plugin):
    name = "robust_dpo"
    description = "DPO under label noise: robust (unbiased) or conservative (label smoothing) (owns the loss)"

    @dataclass
    class Options:
        beta: float = field(default=0.1, metadata={"help": "DPO's β."})
        epsilon: float = field(default=0.1, metadata={"help": "Probability that a preference label is flipped."})
        variant: Literal["robust", "conservative"] = field(default="robust", metadata={
            "help": "'robust': unbiased estimator; 'conservative': label smoothing (cDPO)."})

        def validate(self):
            if self.beta <= 0:
                raise ValueError(f"beta must be positive, got {self.beta}")
            if not 0 <= self.epsilon < 0.5:
                raise ValueError(f"epsilon must be in [0, 0.5), got {self.epsilon}")

    @hookimpl
    def posttrain_reference_needed(self):
        return True

    @hookimpl
    def posttrain_preference_loss(self, logps):
        import torch.nn.functional as F

        beta, eps = self.options.beta, self.options.epsilon
        chosen, rejected = logps.chosen_logratios, logps.rejected_logratios
        z = beta * (chosen - rejected)
        if self.options.variant == "robust":
            losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        else:
            losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        return PreferenceLoss(losses, beta * chosen.detach(), beta * rejected.detach())
