"""Base class of the verifier reward sources: check each completion against a dataset column.

A subclass implements ``score(completion, gold)``, returning True (right), False (wrong), a
fraction in [0, 1] (partly right) or None (this example cannot be judged: the source abstains
on it), and may add options by subclassing ``Verifier.Options``. The base turns that into the
``posttrain_reward`` hook, the same way for every verifier:

- options ``alpha`` (the reward of a right answer: α × the verdict), ``weight`` (the source's
  weight among several), ``column`` (the dataset column holding the gold value, ``ground_truth``
  by default: Tülu 3's name for it) and ``only_if`` (score only the examples whose columns hold
  one of the given values);
- abstention: no reward from this source for an example whose gold value is missing or that
  ``only_if`` leaves out, and for a whole batch without the gold column (logged once, naming the
  columns the batch does have).

Verifiers that check in worker processes score a batch at once by overriding
``score_batch(completions, golds, prompts)`` (it gets only the examples to be judged). A verifier
that needs more than one column overrides ``golds(columns, n)``. ``posttrain_reward`` takes
``completions`` and ``columns``; a subclass that needs the prompts overrides it with a
``prompts`` argument and calls :meth:`Verifier.rewards`.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Any

from .hookspecs import hookimpl
from .plugin import Plugin

log = logging.getLogger(__name__)


class Verifier(Plugin, abc.ABC):
    @dataclass
    class Options:
        alpha: float = field(default=10.0, metadata={
            "help": "Reward for a right answer: α × the verdict (Tülu 3 uses 10)."})
        weight: float = field(default=1.0, metadata={"help": "Weight of this source when rewards are combined."})
        column: str = field(default="ground_truth", metadata={
            "help": "Dataset column holding the gold value (Tülu 3's name, ground_truth, by default)."})
        only_if: dict[str, list[Any]] = field(default_factory=dict, metadata={
            "help": "Score only examples whose columns hold one of these values, e.g. {dataset: [gsm8k]} in a mixed "
                    "dataset; abstain on the others."})

    @abc.abstractmethod
    def score(self, completion: Any, gold: Any) -> bool | float | None:
        """True if ``completion`` is right for ``gold``, False if not, a fraction in [0, 1] if partly
        right, None if it cannot be judged."""

    def score_batch(self, completions: list, golds: list, prompts: list) -> list:
        """The verdicts of several examples (all to be judged); one :meth:`score` after another by default."""
        return [self.score(completion, gold) for completion, gold in zip(completions, golds, strict=True)]

    def golds(self, columns: dict, n: int) -> list | None:
        """The gold value of each example (None where there is none), or None when the batch has no gold column."""
        return columns.get(self.options.column)

    def applies(self, columns: dict, i: int) -> bool:
        """Whether example ``i`` passes the ``only_if`` filter."""
        return all(columns.get(name, [None] * (i + 1))[i] in values for name, values in self.options.only_if.items())

    def _log_missing_column(self, columns: dict) -> None:
        if not getattr(self, "_missing_column_logged", False):
            self._missing_column_logged = True
            log.warning("%s abstains on batches without its gold column '%s' (the batch has: %s); set the "
                        "`column` option if the gold values are in another column", self.name, self.options.column,
                        ", ".join(sorted(map(str, columns))) or "no columns")

    def rewards(self, completions: list, columns: dict, prompts: list | None = None) -> list | None:
        """This source's reward per completion (None = abstained), or None to abstain on the batch."""
        golds = self.golds(columns, len(completions))
        if golds is None:
            self._log_missing_column(columns)
            return None
        golds = list(golds)
        if len(golds) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold values")
        prompts = list(prompts) if prompts is not None else []
        prompts += [None] * (len(completions) - len(prompts))
        judged = [i for i, gold in enumerate(golds) if gold is not None and self.applies(columns, i)]
        verdicts = self.score_batch([completions[i] for i in judged], [golds[i] for i in judged],
                                    [prompts[i] for i in judged]) if judged else []
        rewards: list = [None] * len(completions)
        for i, verdict in zip(judged, verdicts, strict=True):
            rewards[i] = None if verdict is None else self.options.alpha * float(verdict)
        return rewards

    @hookimpl
    def posttrain_required_columns(self):
        """The gold column (and the only_if columns): data without them would give no reward at all, and
        training would run to the end on nothing; refused before anything loads."""
        return [self.options.column, *self.options.only_if]

    @hookimpl
    def posttrain_reward(self, completions, columns):
        return self.rewards(completions, columns)

    def close(self) -> None:
        """Release what the verifier holds (checking processes); it starts them again when used."""
