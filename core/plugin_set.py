"""The plugins one run uses: :func:`build_plugin_set` enables the plugins a recipe names, with their
options, and checks them against the stage and each other (before any model is loaded);
:class:`PluginSet` calls their hooks, in recipe order, under each hook's contract (``hookspecs.CONTRACTS``).

``POSTTRAIN_TRACE_HOOKS=1`` prints every hook call to stderr.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pluggy

from . import hookspecs, registry
from .errors import PluginHookError, UserError, contract_error, describe_value
from .plugin import Plugin
from .registry import hook_methods
from .stage import Stage

ENV_TRACE = "POSTTRAIN_TRACE_HOOKS"


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
            shown = ", ".join(f"{k}={describe_value(v, 40)}" for k, v in args.items())
            sys.stderr.write(f"posttrain hook: {impl.plugin_name}.{hook}({shown}) -> {describe_value(result)}\n")
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
        info = registry.find_plugin(str(name))
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
            found, _ = registry.discover()
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
            found, _ = registry.discover()
            providers = [n for n, info in found.items() if need in set(info.cls.provides) | set(info.hooks)]
            what = f"a plugin implementing {need}" if need.startswith("posttrain_") else f"a plugin providing {need}"
            raise UserError(f"plugin '{p.name}' needs {what}, and no enabled plugin is one", field=f"plugins.{p.name}",
                            fix=f"enable one of: {', '.join(providers) or '(none installed)'}, or remove '{p.name}'")
    return PluginSet(plugins)
