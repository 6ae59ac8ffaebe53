"""The hinge preference loss (SLiC-HF): max(0, 1 - β·margin) on the DPO log-ratio margin."""

from dataclasses import dataclass, field

from posttrain import Plugin, PreferenceLoss, hookimpl


class Hinge(Plugin):
    name = "hinge"
    description = "hinge loss on the DPO log-ratio margin (SLiC-HF)"

    @dataclass
    class Options:
        beta: float = field(default=0.1, metadata={"help": "Scale of the margin; the hinge is at 1/β."})

        def validate(self):
            if self.beta <= 0:
                raise ValueError("beta must be positive")

    @hookimpl
    def posttrain_preference_loss(self, logps):
        import torch

        chosen = self.options.beta * logps.chosen_logratios
        rejected = self.options.beta * logps.rejected_logratios
        losses = torch.relu(1 - (chosen - rejected))
        return PreferenceLoss(losses, chosen.detach(), rejected.detach())
