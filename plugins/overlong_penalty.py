"""DAPO's soft overlong punishment: a reward source that penalises a completion for its length as it nears
the completion limit, so that a cut-off answer is not scored like a finished one.

With L the completion limit (``max_length``: the stage's ``training.max_completion_length`` unless set)
and B the buffer before it (``buffer``), a completion of n tokens scores

    R_len(n) = 0                   n ≤ L − B
               ((L − B) − n) / B   L − B < n ≤ L       (a ramp from 0 down to −1)
               −1                  n > L

times ``factor``. n counts the completion's tokens as generated (``completion_ids``: up to and
including the EOS token that ended it), so a completion cut at the limit has n = L and scores
−factor. The source's score is added to the other sources' with its ``weight``, as every reward
source's is, and logged as ``rewards/overlong_penalty/mean``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import Plugin, UserError, hookimpl


def soft_overlong(length: int, limit: int, buffer: int) -> float:
    """R_len(length) of the ramp above, in [−1, 0]."""
    start = limit - buffer
    if length <= start:
        return 0.0
    if length > limit:
        return -1.0
    return (start - length) / buffer


class OverlongPenalty(Plugin):
    name = "overlong_penalty"
    description = "reward source: DAPO's soft overlong punishment, 0 down to −1 over a buffer before the limit"
    stages = ("online",)

    @dataclass
    class Options:
        buffer: int = field(default=0, metadata={
            "help": "Tokens before the limit over which the penalty ramps from 0 to −1 (DAPO's L_cache); 0: a "
                    "quarter of the limit."})
        max_length: int = field(default=0, metadata={
            "help": "The completion limit L (DAPO's L_max); 0: the stage's training.max_completion_length."})
        factor: float = field(default=1.0, metadata={"help": "The penalty at the limit (−factor)."})
        weight: float = field(default=1.0, metadata={
            "help": "Weight of this source when the enabled sources' rewards are added."})

        def validate(self):
            if self.buffer < 0 or self.max_length < 0:
                raise ValueError("buffer and max_length must be 0 or more")
            if self.factor < 0:
                raise ValueError("factor must be 0 or more (the penalty is −factor at the limit)")

    def __init__(self, options=None):
        super().__init__(options)
        self.limit = self.options.max_length or None

    @hookimpl
    def posttrain_trl_config(self, stage, recipe):
        """Reads the stage's completion limit when ``max_length`` is not given (nothing is set)."""
        if self.limit is None:
            limit = (recipe.get("training") or {}).get("max_completion_length")
            if not isinstance(limit, int) or limit <= 0:
                raise UserError("overlong_penalty needs the completion limit: the recipe sets no "
                                "training.max_completion_length", field="plugins.overlong_penalty.max_length",
                                fix="set training.max_completion_length (the limit generation stops at), or "
                                    "plugins.overlong_penalty.max_length")
            self.limit = limit
        if self.buffer > self.limit:
            raise UserError(f"overlong_penalty's buffer ({self.buffer}) is longer than the limit ({self.limit})",
                            field="plugins.overlong_penalty.buffer",
                            fix=f"use a buffer of at most {self.limit} tokens (DAPO: a fifth to a quarter of it)")
        return None

    @property
    def buffer(self) -> int:
        return self.options.buffer or max(1, (self.limit or 4) // 4)

    @hookimpl
    def posttrain_reward(self, completion_ids):
        return [self.options.factor * soft_overlong(len(ids), self.limit, self.buffer) for ids in completion_ids]
