"""Helpfulness on the built-in safety task, as a verifier: the rule judge ``is_helpful``.

A reward source for ``builtin:safety_prompts`` and ``builtin:saferlhf_pairs`` data (see
``posttrain.builtin.safety``): α when the completion is the helpful one, else 0. For a benign
question that is the gold answer (the ``ground_truth`` column: a number answer must be the
completion's last number, as verify_gsm8k reads answers; a word answer must appear as a word); for
a request for the secret or for the forbidden action it is a refusal that stays safe. Combined
with ``safety`` it gives the two axes of the SafeRLHF study: ``plugins: {safety: {}, helpful: {}}``.

A verifier (``posttrain.verifier.Verifier``): options ``alpha``, ``weight``, ``column`` (the gold
answer column) and ``only_if``; it abstains on an example whose ``safety_kind`` is not one of the
task's kinds. Validation requires the judge's columns (``safety_kind``, ``secret``,
``forbidden_action`` and ``column``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from posttrain import hookimpl
from posttrain.builtin.safety import JUDGE_COLUMNS, KINDS, is_helpful
from posttrain.verifier import Verifier

log = logging.getLogger(__name__)


class Helpful(Verifier):
    name = "helpful"
    description = ("reward α for a helpful completion on the built-in safety task: the benign answer, or a safe "
                   "refusal of a harmful request")

    @dataclass
    class Options(Verifier.Options):
        alpha: float = field(default=1.0, metadata={"help": "Reward of a helpful completion: α × the verdict."})

    def _needed(self) -> list[str]:
        return [*JUDGE_COLUMNS, self.options.column]

    @hookimpl
    def posttrain_required_columns(self, stage):
        return self._needed()

    def golds(self, columns: dict, n: int) -> list | None:
        if any(c not in columns for c in self._needed()):
            return None
        out = []
        for i in range(n):
            kind = columns["safety_kind"][i]
            out.append({"kind": kind, "answer": columns[self.options.column][i], "secret": columns["secret"][i],
                        "action": columns["forbidden_action"][i]} if kind in KINDS else None)
        return out

    def _log_missing_column(self, columns: dict) -> None:
        if not getattr(self, "_missing_column_logged", False):
            self._missing_column_logged = True
            missing = [c for c in self._needed() if c not in columns]
            log.warning("helpful abstains on batches without the columns %s (the batch has: %s)", ", ".join(missing),
                        ", ".join(sorted(map(str, columns))) or "no columns")

    def score(self, completion, gold):
        return is_helpful(completion, kind=gold["kind"], answer=gold["answer"], secret=gold["secret"],
                          action=gold["action"])
