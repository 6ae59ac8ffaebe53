"""RPO's NLL term: add α times the per-token negative log-likelihood of the chosen responses.

    L = L_pref + α · mean over pairs of ( -log π(y_w|x) / |y_w| )        (reduction: sequence)

``reduction: token`` averages over all chosen-response tokens of the batch instead, which is
TRL's ``loss_type="sft"`` term; the two agree when all chosen responses have the same length.
It keeps the chosen responses likely while the preference loss pulls the margin apart (Llama 3
adds it to DPO). An additive term: it works with any preference loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain import Plugin, hookimpl


class RPO(Plugin):
    name = "rpo"
    description = "adds α · per-token NLL of the chosen response to any preference loss (loss term)"

    @dataclass
    class Options:
        alpha: float = field(default=1.0, metadata={"help": "Weight α of the NLL term."})
        reduction: Literal["sequence", "token"] = field(default="sequence", metadata={
            "help": "'sequence': NLL/|y_w| averaged over pairs; 'token': averaged over all tokens (TRL's sft)."})

        def validate(self):
            if self.alpha < 0:
                raise ValueError(f"alpha must be >= 0, got {self.alpha}")

    @hookimpl
    def posttrain_loss_terms(self, logps):
        total = -logps.chosen_token_logps.sum(dim=1)
        if self.options.reduction == "sequence":
            nll = (total / logps.chosen_lengths.clamp(min=1)).mean()
        else:
            nll = total.sum() / logps.chosen_mask.sum().clamp(min=1)
        return {"rpo_nll": self.options.alpha * nll}
