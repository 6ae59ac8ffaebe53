"""GSM8K-style verifier: the last number in the completion equals the gold answer.

A reward source: it scores α when the last number in the completion (thousands separators
such as 1,234 allowed) equals the last number of the gold answer column, else 0, and abstains
for examples without a gold answer. In a preference stage it scores the held-out greedy
answers (the "answer accuracy" of the summary); online stages train against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction

from posttrain import Plugin, hookimpl
from posttrain.types import completion_text

# Longest tail of a completion that is searched: a number is never that long, and this keeps
# the cost bounded on hostile megabyte outputs.
_TAIL = 4096
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def last_number(text: str) -> Fraction | None:
    """The last number written in ``text``, exactly, or None."""
    matches = _NUMBER.findall(text[-_TAIL:])
    if not matches:
        return None
    try:
        return Fraction(matches[-1].replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


class VerifyGSM8K(Plugin):
    name = "verify_gsm8k"
    description = "reward α when the completion's last number equals the gold answer (GSM8K rule)"

    @dataclass
    class Options:
        alpha: float = field(default=10.0, metadata={"help": "Reward for a correct answer (Tülu 3 uses 10)."})
        weight: float = field(default=1.0, metadata={"help": "Weight of this source when rewards are combined."})
        column: str = field(default="ground_truth", metadata={"help": "Dataset column holding the gold answer."})

    @hookimpl
    def posttrain_reward(self, completions, columns):
        golds = columns.get(self.options.column)
        if golds is None:
            return None
        scores = []
        for completion, gold in zip(completions, golds, strict=True):
            want = last_number(str(gold)) if gold is not None else None
            if want is None:
                scores.append(None)
                continue
            got = last_number(completion_text(completion))
            scores.append(self.options.alpha if got == want else 0.0)
        return scores
