"""Base class for verifier reward sources: check each completion against a dataset column.

A subclass implements ``score(completion, gold) -> bool | None`` (None: cannot judge this
example, the source abstains) and may add options to ``Options``. The base turns that into the
``posttrain_reward`` hook: α for True, 0 for False, abstaining for examples whose column value
is missing or that ``only_if`` leaves out, and for whole batches without the column.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from .hookspecs import hookimpl
from .plugin import Plugin


class Verifier(Plugin, abc.ABC):
    @dataclass
    class Options:
        alpha: float = field(default=10.0, metadata={"help": "Reward for a correct answer (Tülu 3 uses 10)."})
        weight: float = field(default=1.0, metadata={"help": "Weight of this source when rewards are combined."})
        column: str = field(default="ground_truth", metadata={"help": "Dataset column holding the gold answer."})
        only_if: dict[str, list[Any]] = field(default_factory=dict, metadata={
            "help": "Score only examples whose columns hold one of these values, e.g. {dataset: [gsm8k]} in a mixed "
                    "dataset; abstain on the others."})

    @abc.abstractmethod
    def score(self, completion: Any, gold: Any) -> bool | None:
        """True if ``completion`` is right for ``gold``, False if not, None if it cannot be judged."""

    def applies(self, columns: dict, i: int) -> bool:
        """Whether example ``i`` passes the ``only_if`` filter."""
        return all(columns.get(name, [None] * (i + 1))[i] in values for name, values in self.options.only_if.items())

    @hookimpl
    def posttrain_reward(self, completions, columns):
        golds = columns.get(self.options.column)
        if golds is None:
            return None
        rewards = []
        for i, (completion, gold) in enumerate(zip(completions, golds, strict=True)):
            verdict = None if gold is None or not self.applies(columns, i) else self.score(completion, gold)
            rewards.append(None if verdict is None else (self.options.alpha if verdict else 0.0))
        return rewards
