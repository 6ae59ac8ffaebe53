"""TPO: Triple Preference Optimization (Saeidi et al., 2024).

Each example has a prompt, a chosen, a rejected and a gold ``reference`` response. The loss is a
reference-model-free preference term on (chosen, rejected) plus α times the NLL of the gold
response:

    Δ = log π(y_w|x) - log π(y_l|x)          (per-token averages for the ipo and tpo-l variants)
    sigmoid: -(1-ε) log σ(βΔ) - ε log σ(-βΔ)
    hinge:   max(0, 1 - βΔ)
    ipo:     (Δ - 1/(2β))²
    tpo-l:   -(1-ε) log σ(β(Δ - γ/β)) - ε log σ(-β(Δ - γ/β))
    L = mean(term) + α · NLL(gold), the NLL averaged over the gold tokens of the batch

The same definitions as TRL's experimental ``TPOTrainer`` (tested for parity); here it runs in
the core preference stage, so it composes with other plugins (token masks, extra loss terms).
No reference model is loaded or run. With α = 0 the gold column is not needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain import Plugin, PreferenceLoss, hookimpl


class TPO(Plugin):
    name = "tpo"
    description = "Triple Preference Optimization: preference term + α·NLL on a gold 'reference' response (owns the loss)"

    @dataclass
    class Options:
        beta: float = field(default=0.01, metadata={"help": "β of the preference term (τ for the ipo variant)."})
        variant: Literal["sigmoid", "hinge", "ipo", "tpo-l"] = field(default="sigmoid", metadata={
            "help": "Preference term: sigmoid, hinge, ipo, or tpo-l (length-normalised with margin γ)."})
        alpha: float = field(default=1.0, metadata={"help": "Weight α of the NLL on the gold response (0: none)."})
        gamma: float = field(default=0.5, metadata={"help": "Target margin γ of the tpo-l variant."})
        label_smoothing: float = field(default=0.0, metadata={
            "help": "Label-flip probability ε for the sigmoid and tpo-l variants."})

        def validate(self):
            if self.beta <= 0:
                raise ValueError(f"beta must be positive, got {self.beta}")
            if self.alpha < 0:
                raise ValueError(f"alpha must be >= 0, got {self.alpha}")
            if not 0 <= self.label_smoothing < 0.5:
                raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
            if self.label_smoothing > 0 and self.variant in ("hinge", "ipo"):
                raise ValueError(f"label_smoothing does not apply to the {self.variant} variant")

    @hookimpl
    def posttrain_reference_needed(self):
        return False

    @hookimpl
    def posttrain_required_columns(self):
        return ["reference"] if self.options.alpha > 0 else None

    @hookimpl
    def posttrain_preference_loss(self, logps):
        import torch
        import torch.nn.functional as F

        o = self.options
        chosen, rejected = logps.chosen_logps, logps.rejected_logps
        if o.variant in ("ipo", "tpo-l"):
            chosen = chosen / logps.chosen_lengths.clamp(min=1)
            rejected = rejected / logps.rejected_lengths.clamp(min=1)
        delta = chosen - rejected
        if o.variant == "hinge":
            losses = torch.relu(1 - o.beta * delta)
        elif o.variant == "ipo":
            losses = (delta - 1 / (2 * o.beta)) ** 2
        else:
            if o.variant == "tpo-l":
                delta = delta - o.gamma / o.beta
            eps = o.label_smoothing
            losses = -(1 - eps) * F.logsigmoid(o.beta * delta) - eps * F.logsigmoid(-o.beta * delta)
        return PreferenceLoss(losses, o.beta * chosen.detach(), o.beta * rejected.detach())

    @hookimpl
    def posttrain_loss_terms(self, logps):
        if self.options.alpha == 0:
            return None
        if logps.gold_token_logps is None:
            raise ValueError("no gold responses in the batch (is the 'reference' column mapped?)")
        nll = -logps.gold_token_logps.sum() / logps.gold_mask.sum().clamp(min=1)
        return {"tpo_nll": self.options.alpha * nll}
