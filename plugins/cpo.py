"""CPO: contrastive preference optimisation, reference-free, with a behaviour-cloning term (Xu et al., 2024).

    L = −(1 − ε) · log σ(β · (log π(y_w|x) − log π(y_l|x))) − ε · log σ(−β · (...))  +  α · NLL(y_w)

with sequence log-probs (sums over the response tokens), ε = ``label_smoothing`` and NLL the chosen
responses' negative log-likelihood averaged over all their tokens in the batch (TRL's ``CPOTrainer``
with ``loss_type: sigmoid``). The contrastive term is the per-pair loss, the NLL a loss term
(``cpo_nll``, scaled by ``alpha``; 0 leaves it out). No reference model is loaded or run. Tested equal
to TRL's experimental ``CPOTrainer.cpo_loss`` on the same log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import Plugin, PreferenceLoss, hookimpl


class CPO(Plugin):
    name = "cpo"
    description = "CPO: reference-free sigmoid loss on the policy's log-prob margin + α · chosen NLL (owns the loss)"

    @dataclass
    class Options:
        beta: float = field(default=0.1, metadata={"help": "Scale β of the log-prob margin."})
        alpha: float = field(default=1.0, metadata={"help": "Weight α of the chosen responses' NLL (TRL's cpo_alpha)."})
        label_smoothing: float = field(default=0.0, metadata={"help": "ε: the chance a pair's labels are flipped."})

        def validate(self):
            if self.beta <= 0:
                raise ValueError(f"beta must be positive, got {self.beta}")
            if self.alpha < 0:
                raise ValueError(f"alpha must be >= 0, got {self.alpha}")
            if not 0 <= self.label_smoothing < 0.5:
                raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    @hookimpl
    def posttrain_reference_needed(self):
        return False

    @hookimpl
    def posttrain_preference_loss(self, logps):
        import torch.nn.functional as F

        beta, eps = self.options.beta, self.options.label_smoothing
        margin = logps.chosen_logps - logps.rejected_logps
        losses = -(1 - eps) * F.logsigmoid(beta * margin) - eps * F.logsigmoid(-beta * margin)
        return PreferenceLoss(losses, beta * logps.chosen_logps.detach(), beta * logps.rejected_logps.detach())

    @hookimpl
    def posttrain_loss_terms(self, logps):
        if self.options.alpha == 0:
            return None
        nll = -logps.chosen_token_logps.sum() / logps.chosen_mask.sum().clamp(min=1)
        return {"cpo_nll": self.options.alpha * nll}
