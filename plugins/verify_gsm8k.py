"""GSM8K-style verifier: the last number in the completion equals the gold answer.

A reward source: it scores α when the last number in the completion (thousands separators
such as 1,234 allowed) equals the last number of the gold answer column, else 0, and abstains
for examples without a gold answer. In a preference stage it scores the held-out greedy
answers (the "answer accuracy" of the summary); online stages train against it.
"""

from __future__ import annotations

import re
from fractions import Fraction

from posttrain.types import completion_text
from posttrain.verifier import Verifier

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


class VerifyGSM8K(Verifier):
    name = "verify_gsm8k"
    description = "reward α when the completion's last number equals the gold answer (GSM8K rule)"

    def score(self, completion, gold):
        want = last_number(str(gold))
        if want is None:
            return None
        return last_number(completion_text(completion)) == want
