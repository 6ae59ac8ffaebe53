"""SimPO: reference-free, length-normalised preference optimisation with a target margin
(Meng et al., 2024).

    L = -log σ( (β/|y_w|) log π(y_w|x) - (β/|y_l|) log π(y_l|x) - γ )

No reference model at all: when SimPO owns the loss, none is loaded and no reference forward
pass runs. The margin can be given as γ (``gamma``) or, the way Tülu 3 reports it, as the ratio
γ/β (``gamma_beta_ratio``; Tülu's settings: β = 2 with γ/β = 0.5, β = 10 with γ/β = 0.3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import Plugin, PreferenceLoss, hookimpl


class SimPO(Plugin):
    name = "simpo"
    description = "SimPO: reference-free, length-normalised, with target margin γ (owns the loss; no reference)"

    @dataclass
    class Options:
        beta: float = field(default=2.0, metadata={"help": "Scale β of the average log-probs."})
        gamma: float | None = field(default=None, metadata={"help": "Target margin γ (or give gamma_beta_ratio)."})
        gamma_beta_ratio: float | None = field(default=None, metadata={
            "help": "Target margin as γ/β, as Tülu 3 reports it; γ = ratio · β. Default 0.5 if neither is set."})

        def validate(self):
            if self.beta <= 0:
                raise ValueError(f"beta must be positive, got {self.beta}")
            if self.gamma is not None and self.gamma_beta_ratio is not None:
                raise ValueError("give gamma or gamma_beta_ratio, not both")

        @property
        def margin(self) -> float:
            if self.gamma is not None:
                return self.gamma
            ratio = 0.5 if self.gamma_beta_ratio is None else self.gamma_beta_ratio
            return ratio * self.beta

    @hookimpl
    def posttrain_reference_needed(self):
        return False

    @hookimpl
    def posttrain_preference_loss(self, logps):
        import torch.nn.functional as F

        beta = self.options.beta
        chosen = beta * logps.chosen_logps / logps.chosen_lengths.clamp(min=1)
        rejected = beta * logps.rejected_logps / logps.rejected_lengths.clamp(min=1)
        losses = -F.logsigmoid(chosen - rejected - self.options.margin)
        return PreferenceLoss(losses, chosen.detach(), rejected.detach())
