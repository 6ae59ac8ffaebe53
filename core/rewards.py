"""Combining reward sources (the ``posttrain_reward`` hook) into one score per example."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .registry import PluginSet


@dataclass
class Rewards:
    total: list  # float per example, or None where every source abstained
    by_source: dict  # plugin name -> its unweighted scores (None = abstained)


def score(plugins: PluginSet, prompts: list, completions: list, columns: dict) -> Rewards:
    """Weighted sum of every enabled reward source, per example, as the hook's contract says."""
    n = len(completions)
    total: list = [None] * n
    by_source = {}
    for name, scores in plugins.call_each("posttrain_reward", prompts=prompts, completions=completions,
                                          columns=columns):
        if scores is None:
            continue
        if len(scores) != n:
            raise UserError(f"plugin '{name}' returned {len(scores)} rewards for {n} completions",
                            field=f"plugins.{name}", fix="report this to the plugin's author")
        weight = float(getattr(plugins.by_name[name].options, "weight", 1.0))
        by_source[name] = list(scores)
        for i, s in enumerate(scores):
            if s is not None:
                total[i] = (total[i] or 0.0) + weight * float(s)
    return Rewards(total, by_source)
