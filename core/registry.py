"""Finding installed plugins: discovery through entry points, name conflicts, a plugin class's checks.

Every plugin, built-in or third-party, is found the same way: an entry point in the group
``posttrain.plugins`` whose name is the plugin name and whose value is a
:class:`posttrain.Plugin` subclass, or a class named by import path (``package.module:Class``), or a plain
reward function named so. ``POSTTRAIN_PLUGINS=a,b`` restricts loading to those names (the others are not
even imported). The plugins one run enables, and the calls into them, are :mod:`posttrain.plugin_set`'s.

A name belongs to one plugin. A built-in's name (one of posttrain's own entry points) is never
taken by another package: that package's entry point is refused and reported as a conflict. Two
other packages registering one name both lose it: the name is a conflict until one is uninstalled
(or the plugin is named by import path), and a recipe using it is refused naming both.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from typing import Any


from . import hookspecs
from .errors import UserError, did_you_mean
from .plugin import Plugin
from .seams import varnames

ENTRY_POINT_GROUP = "posttrain.plugins"
ENV_ONLY = "POSTTRAIN_PLUGINS"

HOOK_NAMES = tuple(
    name for name, obj in vars(hookspecs).items()
    if name.startswith("posttrain_") and callable(obj)
)


@dataclass
class PluginInfo:
    name: str
    cls: type
    version: str
    distribution: str
    entry_point: str
    hooks: list[str] = field(default_factory=list)


@dataclass
class LoadFailure:
    name: str
    entry_point: str
    distribution: str
    reason: str


@dataclass
class NameConflict:
    """Several installed distributions register one plugin name. ``kept`` is the built-in that keeps
    it (a built-in's name is never taken), or None when nobody does."""

    name: str
    providers: list[tuple[str, str]]  # (distribution, entry point), in discovery order
    kept: tuple[str, str] | None = None

    def describe(self) -> str:
        listed = ", ".join(f"{dist} ({value})" for dist, value in self.providers)
        if self.kept is not None:
            others = [f"{d} ({v})" for d, v in self.providers if (d, v) != self.kept]
            return (f"plugin name '{self.name}' is posttrain's built-in, and {' and '.join(others)} also "
                    f"register{'s' if len(others) == 1 else ''} it: the built-in is used, the other entry point "
                    f"is refused")
        return f"plugin name '{self.name}' is registered by several packages: {listed}"


BUILTIN_DISTRIBUTION = "posttrain"
BUILTIN_MODULE = "posttrain.plugins."


def is_builtin(distribution: str, entry_point: str) -> bool:
    """One of posttrain's own plugins (its distribution, its plugins package)."""
    return distribution == BUILTIN_DISTRIBUTION and entry_point.startswith(BUILTIN_MODULE)


def hook_methods(cls: type) -> list[str]:
    """Names of the methods of ``cls`` marked with ``@hookimpl``."""
    return sorted(
        name for name, member in inspect.getmembers(cls)
        if callable(member) and hasattr(member, f"{hookspecs.PROJECT}_impl")
    )


def check_plugin_class(cls: Any, expected_name: str | None = None) -> list[str]:
    """Return the hooks a plugin class implements, or raise ValueError saying what is wrong."""
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise ValueError(f"{cls!r} is not a subclass of posttrain.Plugin")
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no `name`")
    if expected_name is not None and cls.name != expected_name:
        raise ValueError(f"entry point is named '{expected_name}' but the plugin calls itself '{cls.name}'")
    hooks = hook_methods(cls)
    unmarked = sorted(n for n in dir(cls) if n.startswith("posttrain_") and callable(getattr(cls, n))
                      and n not in hooks)
    if not hooks:
        detail = (f": its method(s) {', '.join(unmarked)} lack the @hookimpl marker" if unmarked else
                  ": no method is marked with @hookimpl")
        raise ValueError(f"{cls.__qualname__} implements no hook{detail} (from posttrain import hookimpl)")
    if unmarked:
        # pluggy would never call them: a reward source without its marker would run with no reward
        raise ValueError(f"{cls.__qualname__}'s method(s) {', '.join(unmarked)} lack the @hookimpl marker, so they "
                         f"would never be called (its marked hooks: {', '.join(hooks)}); mark them with @hookimpl, or "
                         f"rename helpers so that they do not start with posttrain_")
    for hook in hooks:
        if hook not in HOOK_NAMES:
            raise ValueError(f"method '{hook}' is marked @hookimpl but matches no hook{did_you_mean(hook, HOOK_NAMES)}")
        spec_args = set(varnames(getattr(hookspecs, hook))[0])
        impl_args = set(varnames(getattr(cls, hook))[0])
        extra = impl_args - spec_args
        if extra:
            raise ValueError(
                f"hook '{hook}' takes argument(s) {sorted(extra)} that the hook does not provide "
                f"(it provides {sorted(spec_args)})"
            )
    # Options must be a dataclass whose annotations resolve.
    cls.options_schema()
    missing = [req for module, req in cls.requires.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ValueError(f"needs {', '.join(missing)}: pip install {' '.join(repr(m) for m in missing)}")
    return hooks


def _allowed_names() -> set[str] | None:
    raw = os.environ.get(ENV_ONLY)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _entry_points_by_name(allowed: frozenset | None) -> dict[str, list]:
    """The group's entry points by plugin name, each name's providers in discovery order; the same
    distribution seen twice on sys.path (an editable install, a copy in another site folder) counts once."""
    by_name: dict[str, list] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        dist = ep.dist.metadata["Name"] if ep.dist is not None else "?"
        providers = by_name.setdefault(ep.name, [])
        if any(dist == d and ep.value == e.value for d, e in providers):
            continue
        providers.append((dist, ep))
    return by_name


@lru_cache(maxsize=1)
def _discover_cached(allowed: frozenset | None) -> tuple[dict[str, PluginInfo], list[LoadFailure],
                                                         list[NameConflict]]:
    found: dict[str, PluginInfo] = {}
    failures: list[LoadFailure] = []
    conflicts: list[NameConflict] = []
    for name, providers in _entry_points_by_name(allowed).items():
        if len(providers) > 1:
            builtin = [(d, ep) for d, ep in providers if is_builtin(d, ep.value)]
            kept = builtin[0] if len(builtin) == 1 else None
            conflicts.append(NameConflict(name, [(d, ep.value) for d, ep in providers],
                                          (kept[0], kept[1].value) if kept else None))
            if kept is None:
                continue  # nobody gets the name: which package would win depends on sys.path order
            providers = [kept]
        dist, ep = providers[0]
        version = ep.dist.version if ep.dist is not None else "?"
        try:
            cls = ep.load()
            hooks = check_plugin_class(cls, ep.name)
        except Exception as e:  # a broken third-party plugin must not break the listing
            failures.append(LoadFailure(ep.name, ep.value, dist, f"{type(e).__name__}: {e}"))
            continue
        found[ep.name] = PluginInfo(ep.name, cls, version, dist, ep.value, hooks)
    return dict(sorted(found.items())), failures, conflicts


def discover() -> tuple[dict[str, PluginInfo], list[LoadFailure]]:
    """All installed plugins that loaded, by name, and those that failed (with the reason)."""
    found, failures, _ = discover_all()
    return found, failures


def discover_all() -> tuple[dict[str, PluginInfo], list[LoadFailure], list[NameConflict]]:
    """:func:`discover`, and the plugin names that several installed packages register."""
    allowed = _allowed_names()
    return _discover_cached(frozenset(allowed) if allowed is not None else None)


_warned: set[str] = set()  # built-in names whose impostor was reported in this process


def conflict_for(name: str) -> NameConflict | None:
    return next((c for c in discover_all()[2] if c.name == name), None)


def clear_cache() -> None:
    _discover_cached.cache_clear()


def _import_path(path: str) -> PluginInfo:
    """A plugin named in a recipe by import path, ``package.module:ClassName``, or a reward function,
    ``package.module:function`` (wrapped in a plugin class, see :mod:`posttrain.reward_function`)."""
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load plugin '{path}': {type(e).__name__}: {e}", field=f"plugins.{path}",
                        fix="check the import path (module.path:ClassName, or module.path:function for a reward "
                            "function) and that the module is importable") from None
    if callable(cls) and not isinstance(cls, type):
        from .reward_function import function_plugin

        cls = function_plugin(cls, path)
        return PluginInfo(cls.name, cls, "-", "(import path)", path, check_plugin_class(cls))
    if not isinstance(cls, type):
        kind = type(cls).__name__
        raise UserError(f"'{path}' is neither a posttrain.Plugin subclass nor a function: it is "
                        f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}", field=f"plugins.{path}",
                        fix="name a plugin class (module.path:ClassName) or a reward function (module.path:function)")
    try:
        hooks = check_plugin_class(cls)
    except ValueError as e:
        raise UserError(f"cannot use plugin '{path}': {e}", field=f"plugins.{path}", fix=_class_fix(str(e))) from None
    return PluginInfo(cls.name, cls, "-", "(import path)", path, hooks)


def _class_fix(reason: str) -> str:
    """What to do about a plugin class that check_plugin_class refused."""
    if "@hookimpl" in reason:
        return ("decorate each hook method with @hookimpl (`from posttrain import hookimpl`, then `@hookimpl` on the "
                "line above `def posttrain_...`)")
    if "matches no hook" in reason or "does not provide" in reason:
        return "give the method a hook's name and arguments (docs/hooks.md lists them)"
    if "not a subclass" in reason or "has no `name`" in reason:
        return "subclass posttrain.Plugin and give the class a `name` (or name a reward function, module.path:function)"
    if reason.startswith("needs "):
        return reason.split(": ", 1)[-1]
    if "entry point is named" in reason:
        return "give the entry point and the class's `name` the same name, then reinstall the package"
    return "fix the plugin class (docs/plugins.md)"


def find_plugin(name: str) -> PluginInfo:
    """Look a plugin up by name (or import path), with a helpful error when it is not there."""
    if ":" in name:
        return _import_path(name)
    found, failures, conflicts = discover_all()
    conflict = next((c for c in conflicts if c.name == name), None)
    if conflict is not None and conflict.kept is None:
        listed = " and ".join(f"{d} ({v})" for d, v in conflict.providers)
        raise UserError(f"plugin name '{name}' is registered by several installed packages: {listed}",
                        field=f"plugins.{name}",
                        fix="uninstall all but one of them, or name the plugin you mean by import path "
                            f"(e.g. `plugins: {{{conflict.providers[0][1]}: {{}}}}`)")
    if conflict is not None and name in found and name not in _warned:
        _warned.add(name)
        others = ", ".join(f"{d} ({v})" for d, v in conflict.providers if (d, v) != conflict.kept)
        print(f"posttrain: warning: {others} also register{'s' if ',' not in others else ''} the built-in plugin name "
              f"'{name}'; the built-in is used (name the other by import path to use it, or uninstall it)",
              file=sys.stderr)
    if name in found:
        return found[name]
    for failure in failures:
        if failure.name == name:
            raise UserError(f"plugin '{name}' is installed but failed to load: {failure.reason}",
                            field=f"plugins.{name}",
                            fix=(_class_fix(failure.reason) + f" ({failure.distribution}, {failure.entry_point})"
                                 if failure.reason.startswith("ValueError") else
                                 f"fix or reinstall {failure.distribution}"))
    near = next((f for f in failures if f"'{name}'" in f.reason or did_you_mean(name, [f.name])), None)
    if near is not None:  # the plugin meant is probably the one whose entry point failed: say why it failed
        raise UserError(f"unknown plugin '{name}'; the installed entry point '{near.name}' ({near.distribution}, "
                        f"{near.entry_point}) failed to load: {near.reason}", field=f"plugins.{name}",
                        fix=(_class_fix(near.reason) if near.reason.startswith("ValueError") else
                             f"fix or reinstall {near.distribution}")
                            + f"; a plugin is named in a recipe by its entry point's name ('{near.name}')")
    restricted = f" ({ENV_ONLY} is set to '{os.environ[ENV_ONLY]}')" if ENV_ONLY in os.environ else ""
    raise UserError(
        f"unknown plugin '{name}'{did_you_mean(name, found)}{restricted}",
        field=f"plugins.{name}",
        fix=f"run `posttrain plugins` to see the installed plugins. A plugin is found through an entry point in the "
            f"'{ENTRY_POINT_GROUP}' group of its package (`[project.entry-points.\"{ENTRY_POINT_GROUP}\"]`, "
            f"then reinstall the package: an editable install must be reinstalled after its entry points change), "
            f"or name it by import path, `package.module:ClassName`",
    )


