"""The plugin base class and its typed options.

A plugin is a class with a ``name``, an ``Options`` dataclass (its schema) and methods
decorated with ``@hookimpl``, registered under the ``posttrain.plugins`` entry-point group::

    from dataclasses import dataclass
    from posttrain import Plugin, hookimpl

    class MyLoss(Plugin):
        name = "my_loss"
        description = "One line for `posttrain plugins`."

        @dataclass
        class Options:
            beta: float = 0.1

        @hookimpl
        def posttrain_preference_loss(self, logps): ...

The core instantiates the class once per run with the recipe's options, validated against
``Options`` (unknown keys and wrong types are refused before any model is loaded). Keep module
imports light: import torch inside the hook bodies, not at the top of the module.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from .errors import UserError, did_you_mean


class Plugin:
    """Base class of every posttrain plugin."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # Modules the plugin imports when it runs, mapped to the pip requirement that provides them.
    # A plugin whose modules are missing is listed as failed (with the install command) and a
    # recipe enabling it is refused before anything is loaded.
    requires: ClassVar[dict[str, str]] = {}
    # What the plugin suits and what it works with, declared here and checked when a recipe is
    # validated (before anything loads), naming the plugin:
    # - the stages it applies to (empty: any stage that calls one of its hooks);
    stages: ClassVar[tuple[str, ...]] = ()
    # - capabilities it gives other plugins (a hook's name counts as provided by implementing it);
    provides: ClassVar[tuple[str, ...]] = ()
    # - capabilities another enabled plugin must provide (e.g. ("posttrain_critic",): a critic).
    needs: ClassVar[tuple[str, ...]] = ()
    # An advantage estimator that reads the per-token terms of the online stage's Rollouts (``logps``,
    # ``ref_logps``, ``kl_coef``): the trainer computes them for it (with a critic it always does).
    reads_per_token_logps: ClassVar[bool] = False

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def reward_weight(self) -> float:
        """A reward source's weight when the enabled sources' rewards are combined: its ``weight`` option
        when its ``Options`` declare one, else 1.0."""
        names = {f.name for f in dataclasses.fields(self.options)} if dataclasses.is_dataclass(self.options) else ()
        return float(self.options.weight) if "weight" in names else 1.0

    @classmethod
    def parse_options(cls, raw: dict | None, *, where: str) -> Any:
        """Build ``cls.Options`` from recipe data, or raise a UserError naming the field."""
        return parse_options(cls.Options, raw, where=where, owner=f"plugin '{cls.name}'")

    @classmethod
    def options_schema(cls) -> list[dict]:
        """The options as plain data: name, type, default (for listings and docs)."""
        hints = typing.get_type_hints(cls.Options)
        out = []
        for f in dataclasses.fields(cls.Options):
            required = False
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default, required = None, True
            out.append({"name": f.name, "type": type_name(hints[f.name]), "default": default, "required": required,
                        "help": f.metadata.get("help", "")})
        return out


def type_name(tp: Any) -> str:
    if tp is Any:
        return "any"
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def check_type(value: Any, tp: Any, *, field: str) -> Any:
    """Check a YAML value against a type annotation; return it (ints widen to float)."""
    ok, converted = _match(value, tp)
    if not ok:
        raise UserError(
            f"expected {type_name(tp)}, got {value!r} ({type(value).__name__})",
            field=field,
            fix=f"give {field.rsplit('.', 1)[-1]} a value of type {type_name(tp)}",
        )
    return converted


def _match(value: Any, tp: Any) -> tuple[bool, Any]:
    if tp is Any or tp is object:
        return True, value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            ok, conv = _match(value, arg)
            if ok:
                return True, conv
        return False, value
    if origin is Literal:
        return (value in get_args(tp)), value
    if tp is type(None) or tp is None:
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    if tp is str:
        return isinstance(value, str), value
    if origin is list or tp is list:
        if not isinstance(value, list):
            return False, value
        args = get_args(tp)
        if not args:
            return True, value
        out = []
        for item in value:
            ok, conv = _match(item, args[0])
            if not ok:
                return False, value
            out.append(conv)
        return True, out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            return False, value
        args = get_args(tp)
        if not args:
            return True, value
        out = {}
        for k, v in value.items():
            ok_k, _ = _match(k, args[0])
            ok_v, conv = _match(v, args[1])
            if not (ok_k and ok_v):
                return False, value
            out[k] = conv
        return True, out
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def _section(tp: Any) -> tuple[type | None, bool]:
    """The dataclass a field's type names (``Section`` or ``Section | None``), and whether None is allowed."""
    if dataclasses.is_dataclass(tp):
        return tp, False
    if get_origin(tp) in (Union, types.UnionType):
        args = get_args(tp)
        section = next((a for a in args if dataclasses.is_dataclass(a)), None)
        return section, type(None) in args
    return None, False


def parse_options(options_cls: type, raw: dict | None, *, where: str, owner: str) -> Any:
    """Build an options dataclass from recipe data, strictly (unknown keys, types, required). A field whose
    type is itself a dataclass is a nested section, parsed the same way. ``where`` is the dotted path of
    the mapping ("" at the top of a recipe)."""
    raw = {} if raw is None else raw
    at = (lambda key: f"{where}.{key}" if where else key)  # noqa: E731
    if not isinstance(raw, dict):
        raise UserError(f"expected a mapping of options, got {type(raw).__name__}", field=where or "recipe",
                        fix=f"write the options of {owner} as key: value lines, or {{}} for none")
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    for key in raw:
        if key not in fields:
            raise UserError(f"unknown option '{key}' for {owner}{did_you_mean(key, fields)}",
                            field=at(key), fix=f"options of {owner} are: {', '.join(fields) or 'none'}")
    values = {}
    for key, value in raw.items():
        section, optional = _section(hints[key])
        if section is not None and (isinstance(value, dict) or value is True or (value is None and not optional)):
            values[key] = parse_options(section, {} if value in (None, True) else value, where=at(key), owner=owner)
        elif section is not None and value is None:
            values[key] = None
        else:
            values[key] = check_type(value, hints[key], field=at(key))
    for f in fields.values():
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"option '{f.name}' is required", field=at(f.name),
                            fix=f"set {at(f.name)} in the recipe")
    options = options_cls(**values)
    validate = getattr(options, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            # a message that starts with an option's name ("beta must be positive") is about that option
            first = str(e).split(" ", 1)[0].strip(",:;'")
            field = at(first) if first in fields else (where or "recipe")
            raise UserError(str(e), field=field, fix=f"change the options of {owner}") from None
    return options
