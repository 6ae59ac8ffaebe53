"""A penalty for a completion that ends without an EOS token (cut at the completion limit): TRL's
``missing_eos_penalty`` of its online DPO and RLOO configs, as a reward source of the online stage.

    R_eos = −penalty   when the completion was cut at ``training.max_completion_length``
            0          when it ended with an EOS token

added to the other sources' rewards with this source's ``weight`` and logged as
``rewards/missing_eos_penalty/mean`` (so that mean is −penalty × TRL's ``completions/clipped_ratio``).
It encourages answers that finish within the limit; ``overlong_penalty`` ramps the penalty over a
buffer instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import Plugin, hookimpl


class MissingEOSPenalty(Plugin):
    name = "missing_eos_penalty"
    description = "reward source (online): −penalty for a completion cut at the limit without an EOS token"
    stages = ("online",)

    @dataclass
    class Options:
        penalty: float = field(default=1.0, metadata={"help": "Subtracted from the reward of a completion cut "
                                                                "without an EOS token."})
        weight: float = field(default=1.0, metadata={
            "help": "Weight of this source when the enabled sources' rewards are added."})

        def validate(self):
            if self.penalty < 0:
                raise ValueError("penalty must be 0 or more (it is subtracted)")

    @hookimpl
    def posttrain_reward(self, truncated):
        return [-self.options.penalty if cut else 0.0 for cut in truncated]
