"""Errors that reach the user.

`UserError` is anything the user can fix (a recipe key, a plugin name, a missing file): the
CLI prints its message without a traceback and exits with status 2. Everything else is an
internal error (status 1, with a traceback). A plugin that raises or breaks a hook's contract is named
(:class:`PluginHookError`, :func:`contract_error`).
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any


class UserError(Exception):
    """A problem the user can fix. `field` names where it is, `fix` says what to do."""

    keep_run_dir = False  # a failed new run removes its directory unless the error says it is worth keeping

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None):
        self.field = field
        self.fix = fix
        self.message = message
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.field}: {self.message}" if self.field else self.message
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class UserErrors(UserError):
    """Several independent problems of one recipe, found in one pass (``posttrain validate`` reports them all at
    once); each keeps its own field and fix."""

    def __init__(self, errors: list[UserError]):
        self.errors = [inner for e in errors for inner in (e.errors if isinstance(e, UserErrors) else [e])]
        first = self.errors[0]
        super().__init__(first.message, field=first.field, fix=first.fix)
        self.keep_run_dir = any(e.keep_run_dir for e in self.errors)

    def render(self) -> str:
        if len(self.errors) == 1:
            return self.errors[0].render()
        return f"{len(self.errors)} problems:\n" + "\n".join(
            f"  {i}. " + e.render().replace("\n", "\n     ") for i, e in enumerate(self.errors, start=1))


class Problems:
    """The user errors of independent checks, collected so that one pass reports every one of them:
    ``with problems.check(): ...`` for each check, then :meth:`raise_any`."""

    def __init__(self):
        self.errors: list[UserError] = []

    @contextlib.contextmanager
    def check(self):
        try:
            yield
        except UserError as e:
            self.errors.append(e)

    def raise_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise UserErrors(self.errors)


class PluginHookError(UserError):
    """A plugin raised inside one of its hook implementations."""

    def __init__(self, plugin: str, hook: str, error: BaseException):
        self.plugin = plugin
        self.hook = hook
        self.error = error
        super().__init__(
            f"plugin '{plugin}' failed in hook '{hook}': {type(error).__name__}: {error}",
            field=f"plugins.{plugin}",
            fix=f"check the options of '{plugin}' or disable it; set POSTTRAIN_DEBUG=1 for the traceback",
        )


class RewardFunctionError(PluginHookError):
    """A reward function named in a recipe by import path (``module:function``) raised."""

    def __init__(self, name: str, path: str, error: BaseException):
        self.plugin = name
        self.hook = "posttrain_reward"
        self.error = error
        self.path = path
        UserError.__init__(
            self, f"reward function '{name}' ({path}) failed: {type(error).__name__}: {error}",
            field=f"plugins.{path}",
            fix=f"fix the function or remove '{path}' from the recipe; set POSTTRAIN_DEBUG=1 for the traceback",
        )


def did_you_mean(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)"


def describe_value(value: Any, limit: int = 80) -> str:
    """A short description of a hook argument or result, for traces and contract errors."""
    kind = type(value).__name__
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"{kind}(shape={tuple(shape)}, dtype={value.dtype})"
    if kind == "Dataset" and hasattr(value, "num_rows"):
        return f"Dataset({value.num_rows} rows, columns {value.column_names})"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(describe_value(v, 20) for v in value[:3]) + (", ..." if len(value) > 3 else "")
        return f"{kind}[{len(value)}]({inner})"
    if isinstance(value, dict):
        inner = ", ".join(f"{k}: {describe_value(v, 20)}" for k, v in list(value.items())[:4])
        return "{" + inner + (", ..." if len(value) > 4 else "") + "}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def contract_error(plugin: str, hook: str, got: Any, expected: str) -> UserError:
    """The error for a hook result that breaks the hook's contract (the plugin's fault, not the core's)."""
    return UserError(f"plugin '{plugin}' must return {expected} from hook '{hook}'; it returned {describe_value(got)}",
                     field=f"plugins.{plugin}",
                     fix=f"fix the plugin (see `{hook}` in docs/hooks.md) or disable it; report it to its author")
