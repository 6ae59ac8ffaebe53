"""Base class of the verifier reward sources: check each completion against a dataset column.

A subclass implements ``score(completion, gold)``, returning True (right), False (wrong), a
fraction in [0, 1] (partly right) or None (this example cannot be judged: the source abstains
on it), and may add options by subclassing ``Verifier.Options``. The base turns that into the
``posttrain_reward`` hook, the same way for every verifier:

- options ``alpha`` (the reward of a right answer: α × the verdict), ``weight`` (the source's
  weight among several), ``column`` (the dataset column holding the gold value, ``ground_truth``
  by default: Tülu 3's name for it; a dotted path reads a field of a mapping column, as verl's
  ``reward_model.ground_truth``) and ``only_if`` (score only the examples whose columns hold
  one of the given values);
- the gold values checked before anything loads (``posttrain_check_record``): a value of a kind
  the verifier cannot read (``gold_kinds``: a mapping or a list where an answer goes) refuses
  the data naming the row, instead of scoring every completion 0;
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


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "text", list: "list", tuple: "list", dict: "mapping"}.get(type(value), type(value).__name__)


class Verifier(Plugin, abc.ABC):
    # the kinds of gold value score() reads ("text", "number", "bool", "list", "mapping"); None: any
    gold_kinds: tuple | None = ("text", "number")

    @dataclass
    class Options:
        alpha: float = field(default=10.0, metadata={
            "help": "Reward for a right answer: α × the verdict (Tülu 3 uses 10)."})
        weight: float = field(default=1.0, metadata={"help": "Weight of this source when rewards are combined."})
        column: str = field(default="ground_truth", metadata={
            "help": "Dataset column holding the gold value (Tülu 3's name, ground_truth, by default); a dotted path "
                    "reads a field of a mapping column (verl's reward_model.ground_truth)."})
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

    def _path(self) -> list[str]:
        return self.options.column.split(".")

    @staticmethod
    def _field(value, keys: list[str]):
        """``value[k1][k2]...``, None where a key is missing or a value on the way is not a mapping."""
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def golds(self, columns: dict, n: int) -> list | None:
        """The gold value of each example (None where there is none), or None when the batch has no gold column."""
        top, *keys = self._path()
        values = columns.get(top)
        if values is None or not keys:
            return values
        return [self._field(value, keys) for value in values]

    def gold_problem(self, record: dict) -> str | None:
        """What makes a record's gold value unreadable by this verifier, or None."""
        top, *keys = self._path()
        value = record.get(top)
        if value is None:
            return None  # no gold: the verifier abstains on the example
        for depth, key in enumerate(keys):  # a null field abstains as a null column does; a missing one is an error
            if not isinstance(value, dict) or key not in value:
                path = ".".join([top, *keys[:depth]])
                return (f"'{path}' has no field {key}" + (f" (its keys: {', '.join(map(str, value))})"
                                                          if isinstance(value, dict) else f" (it is a {_kind(value)})"))
            value = value[key]
            if value is None:
                return None
        kind = _kind(value)
        if self.gold_kinds is None or kind in self.gold_kinds:
            return None
        hint = (f"; name a field inside it, e.g. column: {self.options.column}.{next(iter(value))}"
                if kind == "mapping" and value else "")
        return (f"'{self.options.column}' is a {kind}, not a gold answer {self.name} can read "
                f"({' or '.join(self.gold_kinds)}){hint}")

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
        return [self._path()[0], *self.options.only_if]

    @hookimpl
    def posttrain_check_record(self, record):
        """A gold value this verifier cannot read (a mapping or a list where an answer goes) would score every
        completion 0 in silence: refused, naming the row."""
        return self.gold_problem(record) if self.applies({k: [v] for k, v in record.items()}, 0) else None

    @hookimpl
    def posttrain_reward(self, completions, columns):
        return self.rewards(completions, columns)

    def close(self) -> None:
        """Release what the verifier holds (checking processes); it starts them again when used."""
