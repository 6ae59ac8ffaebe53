"""DPO with the sigmoid (Bradley-Terry) loss of Rafailov et al. (2023).

    L = -log σ( β [ (log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x)) ] )

Implicit reward of a response: β (log π(y|x) - log π_ref(y|x)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import Plugin, PreferenceLoss, hookimpl


class DPO(Plugin):
    name = "dpo"
    description = "DPO, sigmoid loss on the policy/reference log-ratio margin (owns the preference loss)"

    @dataclass
    class Options:
        beta: float = field(default=0.1, metadata={"help": "Inverse temperature β: strength of the pull to the reference."})

        def validate(self):
            if self.beta <= 0:
                raise ValueError(f"beta must be positive, got {self.beta}")

    @hookimpl
    def posttrain_reference_needed(self):
        return True

    def logratios(self, logps):
        """The chosen and rejected log-ratios the sigmoid compares (variants override this)."""
        return logps.chosen_logratios, logps.rejected_logratios

    @hookimpl
    def posttrain_preference_loss(self, logps):
        import torch.nn.functional as F

        beta = self.options.beta
        chosen, rejected = self.logratios(logps)
        losses = -F.logsigmoid(beta * (chosen - rejected))
        return PreferenceLoss(losses, beta * chosen.detach(), beta * rejected.detach())
