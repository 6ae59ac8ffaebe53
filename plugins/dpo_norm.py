"""Length-normalised DPO (Tülu 3's "DPO-norm").

Each log-ratio is divided by its own response length before the sigmoid:

    L = -log σ( β [ (log π(y_w|x) - log π_ref(y_w|x)) / |y_w| - (log π(y_l|x) - log π_ref(y_l|x)) / |y_l| ] )

It removes the pull of summed log-probs towards short responses and stops long pairs from
dominating the loss. Tülu 3 8B used β = 5 with lr 5e-7. Equals TRL's ``loss_type="sigmoid_norm"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.plugins.dpo import DPO


class DPONorm(DPO):
    name = "dpo_norm"
    description = "length-normalised DPO (Tülu 3): log-ratios divided by response length (owns the loss)"

    @dataclass
    class Options(DPO.Options):
        beta: float = field(default=5.0, metadata={"help": "β on per-token log-ratios; Tülu 3 8B used 5."})

    def logratios(self, logps):
        return (logps.chosen_logratios / logps.chosen_lengths.clamp(min=1),
                logps.rejected_logratios / logps.rejected_lengths.clamp(min=1))
