"""ORPO: odds-ratio preference optimisation, reference-free, with the SFT term built in (Hong et al., 2024).

With p(y|x) = exp of the mean per-token log-prob of a response and odds(y|x) = p / (1 − p),

    L = NLL(y_w) − β · log σ( log odds(y_w|x) − log odds(y_l|x) )

where NLL is the chosen responses' negative log-likelihood averaged over all their tokens in the
batch (TRL's ``ORPOTrainer`` form; the paper's λ is β). The odds-ratio term is the per-pair loss
(``posttrain_preference_loss``), the NLL a loss term (``orpo_nll``), so the other loss terms and the
token masks combine with it. No reference model is loaded or run. Tested equal to TRL's experimental
``ORPOTrainer.odds_ratio_loss`` on the same log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import Plugin, PreferenceLoss, hookimpl


def log_odds(mean_logps):
    """log(p / (1 − p)) for p = exp(mean_logps) < 1, computed stably."""
    import torch

    return mean_logps - torch.log(-torch.expm1(mean_logps.clamp(max=-1e-6)))


class ORPO(Plugin):
    name = "orpo"
    description = "ORPO: reference-free odds-ratio loss + the chosen responses' NLL (owns the loss; no reference)"

    @dataclass
    class Options:
        beta: float = field(default=0.1, metadata={"help": "Weight β (the paper's λ) of the odds-ratio term."})

        def validate(self):
            if self.beta <= 0:
                raise ValueError(f"beta must be positive, got {self.beta}")

    @hookimpl
    def posttrain_reference_needed(self):
        return False

    @hookimpl
    def posttrain_preference_loss(self, logps):
        import torch.nn.functional as F

        chosen = logps.chosen_logps.float() / logps.chosen_lengths.clamp(min=1)
        rejected = logps.rejected_logps.float() / logps.rejected_lengths.clamp(min=1)
        losses = -self.options.beta * F.logsigmoid(log_odds(chosen) - log_odds(rejected))
        return PreferenceLoss(losses, self.options.beta * chosen.detach(), self.options.beta * rejected.detach())

    @hookimpl
    def posttrain_loss_terms(self, logps):
        nll = -logps.chosen_token_logps.sum() / logps.chosen_mask.sum().clamp(min=1)
        return {"orpo_nll": nll}
