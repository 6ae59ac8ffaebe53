"""IPO: the ΨPO objective with Ψ = identity (Azar et al., 2024).

The log-ratio margin h = (log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))
is regressed onto 1/(2τ):

    L = ( h - 1/(2τ) )²

so the policy stays regularised even when a preference is deterministic (where DPO pushes
π(y_l|x) to 0 whatever β is).

Length: with summed log-probs, h grows with response length and so does the squared loss. By
default (``length_normalize: true``) each log-ratio is divided by its response length first, as
TRL's ``loss_type="ipo"`` does (TRL reports that the IPO authors confirmed this is the form behind
the paper's results); ``length_normalize: false`` gives the paper's formula on summed log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import Plugin, PreferenceLoss, hookimpl


class IPO(Plugin):
    name = "ipo"
    description = "IPO / ΨPO with Ψ = identity: squared loss pulling the margin to 1/(2τ) (owns the loss)"

    @dataclass
    class Options:
        tau: float = field(default=0.1, metadata={"help": "Regularisation τ; the target margin is 1/(2τ)."})
        length_normalize: bool = field(default=True, metadata={
            "help": "Divide each log-ratio by its response length first (TRL's convention)."})

        def validate(self):
            if self.tau <= 0:
                raise ValueError(f"tau must be positive, got {self.tau}")

    @hookimpl
    def posttrain_reference_needed(self):
        return True

    @hookimpl
    def posttrain_preference_loss(self, logps):
        chosen, rejected = logps.chosen_logratios, logps.rejected_logratios
        if self.options.length_normalize:
            chosen = chosen / logps.chosen_lengths.clamp(min=1)
            rejected = rejected / logps.rejected_lengths.clamp(min=1)
        losses = (chosen - rejected - 1 / (2 * self.options.tau)) ** 2
        return PreferenceLoss(losses, chosen.detach(), rejected.detach())
