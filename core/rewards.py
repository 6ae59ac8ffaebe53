"""Reward sources (the ``posttrain_reward`` hook): one source's scores, and their weighted sum."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .registry import PluginSet


@dataclass
class Rewards:
    total: list  # float per example, or None where every source abstained
    by_source: dict  # plugin name -> its unweighted scores (None = abstained)


def source_weight(plugins: PluginSet, name: str) -> float:
    """A reward source's ``weight`` option (1.0 when it has none)."""
    return float(getattr(plugins.by_name[name].options, "weight", 1.0))


def source_scores(plugins: PluginSet, name: str, prompts: list, completions: list, columns: dict) -> list | None:
    """One source's scores: a float or None (abstained) per completion, or None if it abstains on the batch."""
    n = len(completions)
    scores = plugins.call_one(name, "posttrain_reward", prompts=prompts, completions=completions, columns=columns)
    if scores is None:
        return None
    if len(scores) != n:
        raise UserError(f"plugin '{name}' returned {len(scores)} rewards for {n} completions",
                        field=f"plugins.{name}", fix="report this to the plugin's author")
    return [None if s is None else float(s) for s in scores]


def score(plugins: PluginSet, prompts: list, completions: list, columns: dict) -> Rewards:
    """Weighted sum of every enabled reward source, per example, as the hook's contract says."""
    total: list = [None] * len(completions)
    by_source = {}
    for name in plugins.implementers("posttrain_reward"):
        scores = source_scores(plugins, name, prompts, completions, columns)
        if scores is None:
            continue
        weight = source_weight(plugins, name)
        by_source[name] = scores
        for i, s in enumerate(scores):
            if s is not None:
                total[i] = (total[i] or 0.0) + weight * s
    return Rewards(total, by_source)


class RewardSource:
    """A reward plugin as a TRL reward function: ``fn(prompts, completions, completion_ids, **columns)``.

    TRL passes every dataset column (repeated per completion) as a keyword, plus a few of its own
    (trainer state, logging callbacks), which are not dataset columns and are left out. Its name
    is the plugin's, so TRL logs ``rewards/<plugin>/mean`` and ``/std``."""

    _TRL_KEYWORDS = ("trainer_state", "log_extra", "log_metric", "environments")

    def __init__(self, plugins: PluginSet, name: str):
        self.plugins, self.__name__ = plugins, name

    def __call__(self, prompts, completions, completion_ids=None, **columns):
        for key in self._TRL_KEYWORDS:
            columns.pop(key, None)
        scores = source_scores(self.plugins, self.__name__, prompts, completions, columns)
        return [None] * len(completions) if scores is None else scores
