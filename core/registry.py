"""Finding installed plugins and building the set of plugins a run uses.

Every plugin, built-in or third-party, is found the same way: an entry point in the group
``posttrain.plugins`` whose name is the plugin name and whose value is a
:class:`posttrain.Plugin` subclass. ``POSTTRAIN_PLUGINS=a,b`` restricts loading to those names
(the others are not even imported). ``POSTTRAIN_TRACE_HOOKS=1`` prints every hook call.
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

import pluggy
from pluggy._hooks import varnames

from . import hookspecs
from .errors import PluginHookError, UserError, did_you_mean
from .plugin import Plugin

ENTRY_POINT_GROUP = "posttrain.plugins"
ENV_ONLY = "POSTTRAIN_PLUGINS"
ENV_TRACE = "POSTTRAIN_TRACE_HOOKS"

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


@lru_cache(maxsize=1)
def _discover_cached(allowed: frozenset | None) -> tuple[dict[str, PluginInfo], list[LoadFailure]]:
    found: dict[str, PluginInfo] = {}
    failures: list[LoadFailure] = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        dist = ep.dist.metadata["Name"] if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        if ep.name in found:
            if found[ep.name].entry_point == ep.value:  # the same distribution seen twice on sys.path
                continue
            failures.append(LoadFailure(ep.name, ep.value, dist,
                                        f"name already used by {found[ep.name].distribution} ({found[ep.name].entry_point})"))
            continue
        try:
            cls = ep.load()
            hooks = check_plugin_class(cls, ep.name)
        except Exception as e:  # a broken third-party plugin must not break the listing
            failures.append(LoadFailure(ep.name, ep.value, dist, f"{type(e).__name__}: {e}"))
            continue
        found[ep.name] = PluginInfo(ep.name, cls, version, dist, ep.value, hooks)
    return dict(sorted(found.items())), failures


def discover() -> tuple[dict[str, PluginInfo], list[LoadFailure]]:
    """All installed plugins that loaded, by name, and those that failed (with the reason)."""
    allowed = _allowed_names()
    return _discover_cached(frozenset(allowed) if allowed is not None else None)


def clear_cache() -> None:
    _discover_cached.cache_clear()


def _import_path(path: str) -> PluginInfo:
    """A plugin named in a recipe by import path, ``package.module:ClassName``."""
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
        hooks = check_plugin_class(cls)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"cannot load plugin '{path}': {type(e).__name__}: {e}", field=f"plugins.{path}",
                        fix="check the import path (module.path:ClassName) and that the module is importable") from None
    return PluginInfo(cls.name, cls, "-", "(import path)", path, hooks)


def find_plugin(name: str) -> PluginInfo:
    """Look a plugin up by name (or import path), with a helpful error when it is not there."""
    if ":" in name:
        return _import_path(name)
    found, failures = discover()
    if name in found:
        return found[name]
    for failure in failures:
        if failure.name == name:
            raise UserError(f"plugin '{name}' is installed but failed to load: {failure.reason}",
                            field=f"plugins.{name}", fix=f"fix or reinstall {failure.distribution}")
    restricted = f" ({ENV_ONLY} is set to '{os.environ[ENV_ONLY]}')" if ENV_ONLY in os.environ else ""
    raise UserError(
        f"unknown plugin '{name}'{did_you_mean(name, found)}{restricted}",
        field=f"plugins.{name}",
        fix="run `posttrain plugins` to see the installed plugins",
    )


class PluginSet:
    """The plugins enabled for one run, with their options, and the calls into their hooks.

    Hooks are called in the order the recipe lists the plugins. An exception inside a hook
    implementation becomes a :class:`PluginHookError` that names the plugin and the hook.
    """

    def __init__(self, plugins: list[Plugin]):
        self.plugins = plugins
        self.by_name = {p.name: p for p in plugins}
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        # pluggy calls the last registered implementation first: register in reverse so that
        # calls follow the recipe's order.
        for plugin in reversed(plugins):
            self.pm.register(plugin, name=plugin.name)
        self.pm.check_pending()
        if os.environ.get(ENV_TRACE):
            self.pm.trace.root.setwriter(lambda text: sys.stderr.write(text))
            self.pm.enable_tracing()

    def implementers(self, hook: str) -> list[str]:
        return [impl.plugin_name for impl in self._impls(hook)]

    def _raise_named(self, hook: str, error: Exception):
        """Re-raise ``error`` as a PluginHookError naming the plugin whose code raised it."""
        impls = getattr(self.pm.hook, hook).get_hookimpls()
        codes = {getattr(impl.function, "__func__", impl.function).__code__: impl.plugin_name for impl in impls}
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code in codes:
                raise PluginHookError(codes[tb.tb_frame.f_code], hook, error) from error
            tb = tb.tb_next
        raise error

    def call(self, hook: str, **kwargs) -> Any:
        """Call a hook the pluggy way: a list of results, or the first result for firstresult hooks."""
        try:
            return getattr(self.pm.hook, hook)(**kwargs)
        except UserError:  # already names the field and the fix (a PluginHookError or the plugin's own)
            raise
        except Exception as e:
            self._raise_named(hook, e)

    def _impls(self, hook: str) -> list:
        """The implementations of ``hook``, in recipe order."""
        return list(reversed(getattr(self.pm.hook, hook).get_hookimpls()))

    @staticmethod
    def _invoke(impl, hook: str, kwargs: dict) -> Any:
        """Call one implementation with the arguments it accepts; name the plugin if it raises."""
        try:
            return impl.function(**{k: kwargs[k] for k in impl.argnames})
        except UserError:
            raise
        except Exception as e:
            raise PluginHookError(impl.plugin_name, hook, e) from e

    def call_each(self, hook: str, **kwargs) -> list[tuple[str, Any]]:
        """Call every implementation in recipe order: ``[(plugin_name, result), ...]`` (None included)."""
        return [(impl.plugin_name, self._invoke(impl, hook, kwargs)) for impl in self._impls(hook)]

    def call_one(self, plugin: str, hook: str, **kwargs) -> Any:
        """Call one plugin's implementation of ``hook``."""
        impl = next((i for i in self._impls(hook) if i.plugin_name == plugin), None)
        if impl is None:
            raise KeyError(f"plugin '{plugin}' does not implement {hook}")
        return self._invoke(impl, hook, kwargs)

    def chain(self, hook: str, value_arg: str, value: Any, **kwargs) -> tuple[Any, str | None]:
        """Pass ``value`` through every implementation; ``None`` results leave it unchanged.

        Returns the final value and the name of the last plugin that changed it.
        """
        last = None
        for impl in self._impls(hook):
            result = self._invoke(impl, hook, {**kwargs, value_arg: value})
            if result is not None:
                value, last = result, impl.plugin_name
        return value, last

    def merged(self, hook: str, what: str, **kwargs) -> dict:
        """Merge dict results; the same key from two plugins with different values is an error."""
        out: dict = {}
        owner: dict = {}
        for name, result in self.call_each(hook, **kwargs):
            for key, value in (result or {}).items():
                if key in out and out[key] != value:
                    raise UserError(
                        f"plugins '{owner[key]}' and '{name}' both set {what} '{key}' ({out[key]!r} vs {value!r})",
                        field=f"plugins.{name}",
                        fix=f"enable only one of '{owner[key]}' and '{name}', or make them agree",
                    )
                out[key], owner[key] = value, name
        return out


def required_columns(plugins: PluginSet, stage: str) -> dict[str, str]:
    """Columns the enabled plugins need (``posttrain_required_columns``), each with the plugin asking."""
    out: dict[str, str] = {}
    for name, columns in plugins.call_each("posttrain_required_columns", stage=stage):
        for column in columns or []:
            out.setdefault(column, name)
    return out


def build_plugin_set(section: dict | None, stage: str) -> PluginSet:
    """Enable the plugins a recipe names, with validated options; enforce hook ownership."""
    section = section or {}
    plugins = []
    for name, raw in section.items():
        info = find_plugin(str(name))
        options = info.cls.parse_options(raw, where=f"plugins.{name}")
        plugins.append(info.cls(options))
    for hook in hookspecs.SINGLE_OWNER_HOOKS:
        owners = [p.name for p in plugins if hook in hook_methods(type(p))]
        if len(owners) > 1:
            raise UserError(
                f"plugins {' and '.join(repr(o) for o in owners)} both implement '{hook}', which only one plugin may own",
                field="plugins",
                fix=f"enable only one of {', '.join(owners)}",
            )
    used = set(hookspecs.STAGE_HOOKS[stage])
    for p in plugins:
        hooks = hook_methods(type(p))
        specific = [h for h in hooks if h not in hookspecs.GENERAL_HOOKS] or hooks
        if specific and not used.intersection(specific):
            raise UserError(
                f"plugin '{p.name}' does nothing in the {stage} stage: none of its hooks "
                f"({', '.join(h.removeprefix('posttrain_') for h in specific)}) is called there",
                field=f"plugins.{p.name}",
                fix=f"remove '{p.name}' from this recipe, or use it in a stage it works in",
            )
    for hook in hookspecs.REQUIRED_HOOKS.get(stage, ()):
        if not any(hook in hook_methods(type(p)) for p in plugins):
            found, _ = discover()
            providers = [n for n, info in found.items() if hook in info.hooks]
            example = providers[0] if providers else "name"
            raise UserError(
                f"no enabled plugin implements '{hook}', which the {stage} stage needs",
                field="plugins",
                fix=f"enable one of: {', '.join(providers) or '(none installed)'} "
                    f"(e.g. `plugins: {{{example}: {{}}}}`)",
            )
    return PluginSet(plugins)
