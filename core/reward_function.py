"""Plain reward functions as reward sources.

A recipe may name a function by import path where a plugin goes, ``plugins: {"my_rewards:accuracy_reward":
{weight: 1.0}}``. The function has TRL's reward-function signature: it is called with the keywords TRL's
GRPOTrainer passes its ``reward_funcs`` (``prompts``, ``completions``, ``completion_ids``, every dataset
column but the prompt, ``trainer_state``, ``log_extra``, ``log_metric``, and ``environments`` where TRL has
them) and returns one float per completion, ``None`` for a completion it abstains on. Completions come in
TRL's form: a message list ``[{"role": "assistant", "content": ...}]`` for a conversational prompt, a
string for a plain one.

:func:`function_plugin` wraps the function in a :class:`RewardFunction` subclass: a plugin named after the
function (its ``__name__``) with one option, ``weight``, implementing ``posttrain_reward`` and
``posttrain_required_columns`` (the function's parameters without a default that are not TRL's own
keywords: dataset columns it cannot run without). Every stage that scores completions sees it as a
reward plugin. Outside the online stage no TRL trainer scores the completions: ``trainer_state`` is the
stage's trainer's state where one runs (held-out answers) and None elsewhere, and ``log_extra`` and
``log_metric`` accept their values and drop them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import RewardFunctionError, UserError
from .hookspecs import hookimpl
from .plugin import Plugin, parse_options

OWN_ARGUMENTS = ("prompts", "completions", "completion_ids")
# Keywords of TRL's own that are not dataset columns.
TRL_KEYWORDS = ("trainer_state", "log_extra", "log_metric", "environments")
# Dataset columns TRL does not pass to reward functions (the prompt is `prompts`).
LEFT_OUT_COLUMNS = ("prompt", "completion", "completion_ids")

_trl_keywords: contextvars.ContextVar[dict | None] = contextvars.ContextVar("posttrain_trl_reward_keywords",
                                                                           default=None)


@contextlib.contextmanager
def trl_keywords(**values):
    """The TRL keywords (``trainer_state``, ``log_extra``, ...) reward functions called in the block get."""
    token = _trl_keywords.set(values)
    try:
        yield
    finally:
        _trl_keywords.reset(token)


def _dropped(*args, **kwargs) -> None:
    """``log_extra`` and ``log_metric`` where no TRL trainer logs: the values are dropped."""


def current_trl_keywords() -> dict:
    """The TRL keywords of the current call: those set by :func:`trl_keywords`, over ``trainer_state=None`` and
    ``log_extra``/``log_metric`` that drop their values."""
    return {"trainer_state": None, "log_extra": _dropped, "log_metric": _dropped, **(_trl_keywords.get() or {})}


def is_conversational(prompt: Any) -> bool:
    """A prompt in TRL's conversational form: a list of messages with a role."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def trl_completion(prompt: Any, completion: Any) -> Any:
    """A completion as TRL gives it to reward functions: a completion text of a conversational prompt becomes
    ``[{"role": "assistant", "content": text}]``; anything else is left as it is."""
    if isinstance(completion, str) and is_conversational(prompt):
        return [{"role": "assistant", "content": completion}]
    return completion


def required_columns(function: Callable) -> list[str]:
    """The parameters of ``function`` without a default that are not TRL's own keywords: the dataset columns
    it cannot be called without."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a callable whose signature Python cannot read
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters
            if p.kind in kinds and p.default is inspect.Parameter.empty and p.name not in OWN_ARGUMENTS + TRL_KEYWORDS]


def _awaited(awaitable):
    """The result of a coroutine function's call (TRL takes ``async def`` reward functions too)."""

    async def wait():
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # a loop runs in this thread already: wait in another one
        return pool.submit(asyncio.run, wait()).result()


class RewardFunction(Plugin):
    """A plain reward function as a reward source; :func:`function_plugin` makes one subclass per function."""

    function: ClassVar[Callable[..., Any]]
    path: ClassVar[str] = ""  # the import path the recipe names it by

    @dataclass
    class Options:
        weight: float = field(default=1.0, metadata={"help": "Weight of this source when rewards are combined."})

    @classmethod
    def parse_options(cls, raw: dict | None, *, where: str) -> Any:
        return parse_options(cls.Options, raw, where=where, owner=f"reward function '{cls.name}'")

    @hookimpl
    def posttrain_required_columns(self):
        return required_columns(type(self).function)

    @hookimpl
    def posttrain_reward(self, prompts, completions, columns, completion_ids):
        cls = type(self)
        skip = LEFT_OUT_COLUMNS + OWN_ARGUMENTS + TRL_KEYWORDS
        keywords = {key: list(values) for key, values in columns.items() if key not in skip}  # lists, as TRL's
        completions = [trl_completion(p, c) for p, c in zip(prompts, completions, strict=True)]
        try:
            result = cls.function(prompts=list(prompts), completions=completions, completion_ids=completion_ids,
                                  **keywords, **current_trl_keywords())
            if inspect.isawaitable(result):
                result = _awaited(result)
        except UserError:
            raise
        except Exception as e:
            raise RewardFunctionError(cls.name, cls.path, e) from e
        return self._as_floats(result)

    @staticmethod
    def _as_floats(result: Any) -> Any:
        """The function's rewards with numbers as floats (TRL takes a numpy array or a tensor, and numpy
        numbers, too); what they must be is checked as for every reward plugin (one number or None per
        completion)."""
        if hasattr(result, "tolist") and not isinstance(result, (list, tuple)):  # a numpy array, a tensor
            result = result.tolist()
        if isinstance(result, (list, tuple)):
            result = [float(r) if isinstance(r, numbers.Real) and not isinstance(r, bool) else r for r in result]
        return result


def function_name(function: Callable, path: str) -> str:
    """The name a reward function's source has: its ``__name__``, or the name in its import path where it has
    none of its own (a lambda, a ``functools.partial``, a callable object)."""
    name = getattr(function, "__name__", None)
    if not isinstance(name, str) or not name.isidentifier():
        name = path.rpartition(":")[2]
    return name


def function_plugin(function: Callable, path: str) -> type[RewardFunction]:
    """The plugin class of the reward function ``function``, named in a recipe by ``path``."""
    name = function_name(function, path)
    doc = inspect.getdoc(function) if inspect.isfunction(function) or inspect.ismethod(function) else None
    description = doc.strip().splitlines()[0] if doc else f"reward function {path}"
    return type(f"RewardFunction_{name}", (RewardFunction,), {
        "name": name, "description": description, "function": staticmethod(function), "path": path,
        "__module__": __name__, "__doc__": f"The reward function {path} as a reward source."})
