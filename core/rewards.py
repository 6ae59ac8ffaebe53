"""Reward sources (the ``posttrain_reward`` hook): one source's scores, and their weighted sum.

Outside a run, :func:`load_plugin` builds one installed plugin from its options (checked as in a
recipe) and :func:`score_completions` (``posttrain.score``) scores completions with one reward
plugin through the same call the runs make.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .plugin import Plugin
from .registry import find_plugin, hook_methods
from .plugin_set import PluginSet


@dataclass
class Rewards:
    total: list  # float per example, or None where every source abstained
    by_source: dict  # plugin name -> its unweighted scores (None = abstained)


def source_weight(plugins: PluginSet, name: str) -> float:
    """A reward source's weight (:meth:`posttrain.Plugin.reward_weight`: its ``weight`` option, else 1.0)."""
    return plugins.by_name[name].reward_weight()


def source_scores(plugins: PluginSet, name: str, prompts: list, completions: list, columns: dict,
                  completion_ids: list | None = None, truncated: list | None = None) -> list | None:
    """One source's scores: a float or None (abstained) per completion, or None if it abstains on the batch.
    ``completion_ids`` and ``truncated``: each completion's token ids and whether it was cut at the length
    limit (None where unknown)."""
    n = len(completions)
    scores = plugins.call_one(name, "posttrain_reward", prompts=prompts, completions=completions, columns=columns,
                              completion_ids=completion_ids, truncated=truncated)
    if scores is None:
        return None
    if len(scores) != n:
        raise UserError(f"plugin '{name}' returned {len(scores)} rewards for {n} completions from hook "
                        f"'posttrain_reward'; expected one reward (a float, or None to abstain) per completion, in "
                        f"order", field=f"plugins.{name}",
                        fix="fix the plugin (see `posttrain_reward` in docs/hooks.md) or disable it; report it to its "
                            "author")
    return [None if s is None else float(s) for s in scores]


def score(plugins: PluginSet, prompts: list, completions: list, columns: dict, completion_ids: list | None = None,
          truncated: list | None = None) -> Rewards:
    """Weighted sum of every enabled reward source, per example, as the hook's contract says."""
    total: list = [None] * len(completions)
    by_source = {}
    for name in plugins.implementers("posttrain_reward"):
        scores = source_scores(plugins, name, prompts, completions, columns, completion_ids, truncated)
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
    (trainer state, logging callbacks), which are not dataset columns: they are left out of the
    hook's ``columns`` and handed on to reward functions named in the recipe
    (:func:`posttrain.reward_function.trl_keywords`). A completion is truncated when its ids do not end with
    one of ``stop_ids`` (TRL's EOS tokens and the padding token, as TRL counts clipped completions; set by the
    trainer once it knows them). Its name is the plugin's, so TRL logs ``rewards/<plugin>/mean`` and
    ``/std``."""

    def __init__(self, plugins: PluginSet, name: str, stop_ids=None):
        self.plugins, self.__name__ = plugins, name
        self.stop_ids = None if stop_ids is None else set(stop_ids)

    def __call__(self, prompts, completions, completion_ids=None, **columns):
        from .reward_function import TRL_KEYWORDS, trl_keywords

        trl = {key: columns.pop(key) for key in TRL_KEYWORDS if key in columns}
        truncated = None
        if completion_ids is not None:
            completion_ids = [[int(i) for i in ids] for ids in completion_ids]
            if self.stop_ids is not None:
                truncated = [bool(ids) and ids[-1] not in self.stop_ids for ids in completion_ids]
        with trl_keywords(**trl):
            scores = source_scores(self.plugins, self.__name__, prompts, completions, columns, completion_ids,
                                   truncated)
        return [None] * len(completions) if scores is None else scores


def load_plugin(name: str, **options: Any) -> Plugin:
    """The installed plugin ``name`` (or ``module.path:ClassName``, or a reward function's
    ``module.path:function``) built with ``options``, which are
    checked as a recipe's ``plugins.<name>`` section is (UserError naming the option otherwise)."""
    info = find_plugin(str(name))
    return info.cls(info.cls.parse_options(options, where=f"plugins.{name}"))


def score_completions(plugin: Plugin | str, completions: Sequence, prompts: Sequence | None = None,
                      **columns: Sequence) -> list[float | None]:
    """One reward plugin's scores of ``completions``: a float per completion, None where it abstains.

    ``plugin`` is a plugin instance, the name of an installed one, or the import path of a plugin class
    or of a reward function (built with its default options). ``columns`` are the dataset columns the
    plugin reads, one value per completion (e.g. ``ground_truth=["42"]``); ``prompts`` default to empty
    ones. The scores are the plugin's own,
    unweighted, as a run logs them under the plugin's name; a plugin that abstains on the whole
    batch gives None for every completion.
    """
    if isinstance(plugin, str):
        plugin = load_plugin(plugin)
    if not isinstance(plugin, Plugin):
        raise TypeError(f"expected a posttrain plugin or a plugin name, got {type(plugin).__name__}")
    if "posttrain_reward" not in hook_methods(type(plugin)):
        raise UserError(f"plugin '{plugin.name}' is not a reward source (it does not implement posttrain_reward)",
                        field=f"plugins.{plugin.name}", fix="score with a reward plugin, e.g. verify_gsm8k")
    if isinstance(completions, (str, bytes)):
        raise UserError("completions must be a list (one item per completion), not a single string",
                        field="completions", fix="pass [completion]")
    completions = list(completions)
    n = len(completions)
    prompts = [""] * n if prompts is None else _per_completion("prompts", prompts, n)
    columns = {name: _per_completion(f"columns.{name}", values, n) for name, values in columns.items()}
    scores = source_scores(PluginSet([plugin]), plugin.name, prompts, completions, columns)
    return [None] * n if scores is None else scores


def _per_completion(field: str, values: Any, n: int) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise UserError(f"expected a list with one value per completion, got {type(values).__name__}",
                        field=field, fix=f"pass a list of {n} value(s)")
    if len(values) != n:
        raise UserError(f"{len(values)} value(s) for {n} completion(s)", field=field,
                        fix="give one value per completion, in the same order")
    return list(values)
