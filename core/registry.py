"""Finding installed plugins and building the set of plugins a run uses.

Every plugin, built-in or third-party, is found the same way: an entry point in the group
``posttrain.plugins`` whose name is the plugin name and whose value is a
:class:`posttrain.Plugin` subclass. ``POSTTRAIN_PLUGINS=a,b`` restricts loading to those names
(the others are not even imported). ``POSTTRAIN_TRACE_HOOKS=1`` prints every hook call.

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

import pluggy

from . import hookspecs
from .errors import PluginHookError, UserError, did_you_mean
from .plugin import Plugin
from .seams import varnames
from .stage import Stage

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


def _describe(value: Any, limit: int = 80) -> str:
    """A short description of a hook argument or result, for traces and contract errors."""
    kind = type(value).__name__
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"{kind}(shape={tuple(shape)}, dtype={value.dtype})"
    if kind == "Dataset" and hasattr(value, "num_rows"):
        return f"Dataset({value.num_rows} rows, columns {value.column_names})"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_describe(v, 20) for v in value[:3]) + (", ..." if len(value) > 3 else "")
        return f"{kind}[{len(value)}]({inner})"
    if isinstance(value, dict):
        inner = ", ".join(f"{k}: {_describe(v, 20)}" for k, v in list(value.items())[:4])
        return "{" + inner + (", ..." if len(value) > 4 else "") + "}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def contract_error(plugin: str, hook: str, got: Any, expected: str) -> UserError:
    """The error for a hook result that breaks the hook's contract (the plugin's fault, not the core's)."""
    return UserError(f"plugin '{plugin}' must return {expected} from hook '{hook}'; it returned {_describe(got)}",
                     field=f"plugins.{plugin}",
                     fix=f"fix the plugin (see `{hook}` in docs/hooks.md) or disable it; report it to its author")


class PluginSet:
    """The plugins enabled for one run, with their options, and the calls into their hooks.

    Every call goes through :meth:`_invoke`: implementations are called in the order the recipe
    lists the plugins, with the arguments each accepts; an exception inside one becomes a
    :class:`PluginHookError` naming the plugin and the hook; a result that is not what the hook's
    contract says (``hookspecs.CONTRACTS``) is a user error naming the plugin, the hook, what came
    back and what was expected; with ``POSTTRAIN_TRACE_HOOKS=1`` every call is printed to stderr.
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
        self.trace = bool(os.environ.get(ENV_TRACE))

    def implementers(self, hook: str) -> list[str]:
        return [impl.plugin_name for impl in self._impls(hook)]

    def _impls(self, hook: str) -> list:
        """The implementations of ``hook``, in recipe order."""
        return list(reversed(getattr(self.pm.hook, hook).get_hookimpls()))

    def _invoke(self, impl, hook: str, kwargs: dict) -> Any:
        """Call one implementation with the arguments it accepts; name the plugin if it raises or
        returns something the hook's contract does not allow."""
        args = {k: kwargs[k] for k in impl.argnames}
        try:
            result = impl.function(**args)
        except UserError:
            raise
        except Exception as e:
            raise PluginHookError(impl.plugin_name, hook, e) from e
        if self.trace:
            shown = ", ".join(f"{k}={_describe(v, 40)}" for k, v in args.items())
            sys.stderr.write(f"posttrain hook: {impl.plugin_name}.{hook}({shown}) -> {_describe(result)}\n")
        contract = hookspecs.CONTRACTS[hook]
        if result is not None and not contract.check(result):
            raise contract_error(impl.plugin_name, hook, result, contract.returns)
        return result

    def call(self, hook: str, **kwargs) -> Any:
        """Call a hook the pluggy way: for a first-result hook the first non-None result (or None),
        else the list of non-None results, in recipe order."""
        firstresult = getattr(self.pm.hook, hook).spec.opts.get("firstresult")
        results = []
        for impl in self._impls(hook):
            result = self._invoke(impl, hook, kwargs)
            if result is not None:
                if firstresult:
                    return result
                results.append(result)
        return None if firstresult else results

    def call_each(self, hook: str, **kwargs) -> list[tuple[str, Any]]:
        """Call every implementation in recipe order: ``[(plugin_name, result), ...]`` (None included)."""
        return [(impl.plugin_name, self._invoke(impl, hook, kwargs)) for impl in self._impls(hook)]

    def call_one(self, plugin: str, hook: str, **kwargs) -> Any:
        """Call one plugin's implementation of ``hook``."""
        impl = next((i for i in self._impls(hook) if i.plugin_name == plugin), None)
        if impl is None:
            raise KeyError(f"plugin '{plugin}' does not implement {hook}")
        return self._invoke(impl, hook, kwargs)

    def chain(self, hook: str, value_arg: str, value: Any, on_step=None, unwrap=None, **kwargs) -> tuple[Any, str | None]:
        """Pass ``value`` through every implementation; ``None`` results leave it unchanged.

        Returns the final value and the name of the last plugin that changed it. ``unwrap(result)`` turns a
        result into ``(value, note)`` (default: the result itself, no note); ``on_step(plugin, before,
        after, note)`` is called after each implementation that returned something.
        """
        last = None
        for impl in self._impls(hook):
            result = self._invoke(impl, hook, {**kwargs, value_arg: value})
            if result is not None:
                result, note = unwrap(result) if unwrap is not None else (result, None)
                if on_step is not None:
                    on_step(impl.plugin_name, value, result, note)
                value, last = result, impl.plugin_name
        return value, last

    def reference_needed(self, stage: str) -> bool:
        """``posttrain_reference_needed`` combined as its contract says: needed when some plugin answers True
        or none answers at all; skipped only when some answer False and none True."""
        answers = [a for a in self.call("posttrain_reference_needed", stage=stage) if a is not None]
        return True in answers or not answers

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


def _provided(plugin: Plugin) -> set[str]:
    """What a plugin provides to others: its declared capabilities and the hooks it implements."""
    return set(type(plugin).provides) | set(hook_methods(type(plugin)))


def build_plugin_set(section: dict | None, stage: Stage) -> PluginSet:
    """Enable the plugins a recipe names, with validated options, and check them against the stage and
    each other: the stages each plugin declares it suits, single-owner hooks, plugins whose hooks the
    stage never calls, the hooks the stage needs, and what each plugin needs from the others."""
    section = section or {}
    plugins = []
    keys: dict[str, str] = {}  # plugin name -> the recipe key that enabled it
    for name, raw in section.items():
        info = find_plugin(str(name))
        if "posttrain_format_record" in hook_methods(info.cls):
            raise UserError(f"plugin '{info.name}' is a data format: it reads a source's records, and is named by "
                            "the data section rather than enabled", field=f"plugins.{name}",
                            fix=f"remove it from plugins and set `data: {{format: {info.name}}}` (its options go in "
                                "data.format_options)")
        if info.cls.stages and stage.name not in info.cls.stages:
            suits = " and ".join(info.cls.stages)
            raise UserError(f"plugin '{info.name}' applies to the {suits} stage{'s' if len(info.cls.stages) > 1 else ''}, "
                            f"not to {stage.name}", field=f"plugins.{name}",
                            fix=f"remove '{name}' from this recipe (or stage), or use it where it applies ({suits})")
        options = info.cls.parse_options(raw, where=f"plugins.{name}")
        if info.cls.name in keys:  # e.g. two reward functions of one name from two modules
            raise UserError(f"'{keys[info.cls.name]}' and '{name}' are both named '{info.cls.name}', and a run tells "
                            "its plugins and reward sources apart by name", field=f"plugins.{name}",
                            fix="enable only one of them, or rename one (a reward function's name is its __name__, "
                                "logged as rewards/<name>/mean)")
        keys[info.cls.name] = name
        plugins.append(info.cls(options))
    for hook in hookspecs.SINGLE_OWNER_HOOKS:
        owners = [p.name for p in plugins if hook in hook_methods(type(p))]
        if len(owners) > 1:
            raise UserError(
                f"plugins {' and '.join(repr(o) for o in owners)} both implement '{hook}', which only one plugin may own",
                field="plugins",
                fix=f"enable only one of {', '.join(owners)}",
            )
    used = set(stage.hooks)
    for p in plugins:
        hooks = hook_methods(type(p))
        specific = [h for h in hooks if h not in hookspecs.SUPPORTING_HOOKS] or hooks
        if specific and not used.intersection(specific):
            raise UserError(
                f"plugin '{p.name}' does nothing in the {stage.name} stage: none of its hooks "
                f"({', '.join(h.removeprefix('posttrain_') for h in specific)}) is called there",
                field=f"plugins.{p.name}",
                fix=f"remove '{p.name}' from this recipe, or use it in a stage it works in",
            )
    for hook in stage.required_hooks:
        if not any(hook in hook_methods(type(p)) for p in plugins):
            found, _ = discover()
            providers = [n for n, info in found.items() if hook in info.hooks]
            # the example is one that works alone (gae, for instance, needs a critic too)
            alone = [n for n in providers if not found[n].cls.needs]
            example = (alone or providers or ["name"])[0]
            raise UserError(
                f"no enabled plugin implements '{hook}', which the {stage.name} stage needs",
                field="plugins",
                fix=f"enable one of: {', '.join(providers) or '(none installed)'} "
                    f"(e.g. `plugins: {{{example}: {{}}}}`)",
            )
    for p in plugins:
        for need in type(p).needs:
            if any(need in _provided(other) for other in plugins if other is not p):
                continue
            found, _ = discover()
            providers = [n for n, info in found.items() if need in set(info.cls.provides) | set(info.hooks)]
            what = f"a plugin implementing {need}" if need.startswith("posttrain_") else f"a plugin providing {need}"
            raise UserError(f"plugin '{p.name}' needs {what}, and no enabled plugin is one", field=f"plugins.{p.name}",
                            fix=f"enable one of: {', '.join(providers) or '(none installed)'}, or remove '{p.name}'")
    return PluginSet(plugins)
