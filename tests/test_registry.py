"""Plugin discovery, listing, enabling, ordering and the errors around them."""

import json
import re
from dataclasses import dataclass

import pytest
from conftest import REPO
from posttrain import Plugin, hookimpl, hookspecs
from posttrain.errors import PluginHookError, UserError
from posttrain.registry import check_plugin_class, discover
from posttrain.plugin_set import PluginSet, build_plugin_set
from posttrain.rewards import score


def test_builtins_come_through_the_entry_point_group():
    found, failures = discover()
    assert {"dpo", "verify_gsm8k"} <= set(found)
    assert found["dpo"].distribution == "posttrain"
    assert found["dpo"].entry_point == "posttrain.plugins.dpo:DPO"
    assert "posttrain_preference_loss" in found["dpo"].hooks
    assert not [f for f in failures if f.distribution == "posttrain"]


def test_plugins_listing_json(cli):
    code, out, _ = cli("plugins", "--json")
    assert code == 0
    data = json.loads(out)
    dpo = next(p for p in data["plugins"] if p["name"] == "dpo")
    assert dpo["version"] and dpo["distribution"] == "posttrain"
    assert dpo["options"][0]["name"] == "beta" and dpo["options"][0]["default"] == 0.1


def test_third_party_plugin_is_discovered_listed_and_failures_reported(cli, third_party):
    code, out, _ = cli("plugins")
    assert code == 0
    assert re.search(r"acme_metrics\s+acme-posttrain 0\.3\.0", out)
    assert "posttrain_step_metrics".removeprefix("posttrain_") in out
    code, out, _ = cli("plugins", "--json")
    data = json.loads(out)
    names = {p["name"] for p in data["plugins"]}
    assert {"acme_metrics", "acme_loss", "dpo"} <= names
    failed = {f["name"]: f["reason"] for f in data["failed"]}
    assert "ModuleNotFoundError" in failed["acme_broken"]
    assert "matches no hook" in failed["acme_misnamed"] and "posttrain_preference_loss" in failed["acme_misnamed"]


def test_env_var_restricts_loading(cli, third_party, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_PLUGINS", "dpo,acme_metrics")
    code, out, _ = cli("plugins", "--json")
    names = {p["name"] for p in json.loads(out)["plugins"]}
    assert names == {"dpo", "acme_metrics"}
    assert json.loads(out)["failed"] == []  # acme_broken was not even imported


def test_unknown_plugin_suggests(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"dpoo": {}}))
    assert code == 2
    assert "plugins.dpoo: unknown plugin 'dpoo' (did you mean 'dpo'" in err
    assert "posttrain plugins" in err


def test_plugin_that_failed_to_load_is_explained(cli, write_recipe, third_party):
    code, _, err = cli("validate", write_recipe(plugins={"dpo": {}, "acme_broken": {}}))
    assert code == 2 and "installed but failed to load" in err and "ModuleNotFoundError" in err


def test_unknown_option_suggests(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"dpo": {"betta": 0.2}}))
    assert code == 2 and "plugins.dpo.betta" in err and "did you mean 'beta'" in err


def test_ill_typed_option(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"dpo": {"beta": "high"}}))
    assert code == 2 and "plugins.dpo.beta: expected float, got 'high'" in err


def test_invalid_option_value(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"dpo": {"beta": -1}}))
    assert code == 2 and "beta must be positive" in err


def test_two_loss_owners_are_refused_naming_both(cli, write_recipe, third_party):
    code, _, err = cli("validate", write_recipe(plugins={"dpo": {}, "acme_loss": {}}))
    assert code == 2
    assert "'dpo' and 'acme_loss' both implement 'posttrain_preference_loss'" in err


def test_no_loss_owner_is_refused(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"verify_gsm8k": {}}))
    assert code == 2 and "no enabled plugin implements 'posttrain_preference_loss'" in err and "dpo" in err


def test_plugin_raising_in_a_hook_is_named(cli, write_recipe, third_party):
    code, _, err = cli("validate", write_recipe(plugins={"dpo": {}, "acme_explode": {"where": "config"}}))
    assert code == 2
    assert "plugin 'acme_explode' failed in hook 'posttrain_trl_config': RuntimeError: boom in config" in err


def test_plugin_by_import_path(cli, write_recipe, third_party):
    code, out, err = cli("validate", write_recipe(plugins={"dpo": {}, "acme_posttrain:AcmeMetrics": {"label": "x"}}))
    assert code == 0, err
    code, _, err = cli("validate", write_recipe(plugins={"dpo": {}, "acme_posttrain:Nope": {}}))
    assert code == 2 and "cannot load plugin" in err


# --- the PluginSet's combination rules, with plugins defined right here -------------------------


class Tag(Plugin):
    name = "tag"

    @dataclass
    class Options:
        text: str = "a"
        weight: float = 1.0
        value: float | None = 1.0

    @hookimpl
    def posttrain_transform_dataset(self, dataset):
        return dataset.add_item({"tag": self.options.text})

    @hookimpl
    def posttrain_reward(self, completions):
        return [self.options.value for _ in completions]

    @hookimpl
    def posttrain_trl_config(self):
        return {"learning_rate": 1e-3 if self.options.text == "a" else 1e-4}


def _tag(text, **kw):
    cls = type(f"Tag_{text}", (Tag,), {"name": f"tag_{text}"})
    return cls(Tag.Options(text=text, **kw))


def test_hooks_run_in_recipe_order_and_chain():
    plugins = PluginSet([_tag("a"), _tag("b"), _tag("c")])
    from datasets import Dataset

    out, last = plugins.chain("posttrain_transform_dataset", "dataset", Dataset.from_dict({"tag": []}),
                              split="train", stage="preference")
    assert out["tag"] == ["a", "b", "c"] and last == "tag_c"
    assert plugins.implementers("posttrain_reward") == ["tag_a", "tag_b", "tag_c"]


def test_rewards_combine_by_weight_and_abstention():
    plugins = PluginSet([_tag("a", weight=2.0, value=1.0), _tag("b", weight=0.5, value=None), _tag("c", value=3.0)])
    rewards = score(plugins, ["p", "q"], ["x", "y"], {})
    assert rewards.total == [5.0, 5.0]
    assert rewards.by_source == {"tag_a": [1.0, 1.0], "tag_b": [None, None], "tag_c": [3.0, 3.0]}
    only_abstaining = PluginSet([_tag("b", value=None)])
    assert score(only_abstaining, ["p"], ["x"], {}).total == [None]


def test_merged_config_conflict_names_both():
    with pytest.raises(UserError, match="'tag_a' and 'tag_b' both set TRL config field 'learning_rate'"):
        PluginSet([_tag("a"), _tag("b")]).merged("posttrain_trl_config", "TRL config field", stage="x", recipe={})


def test_call_each_names_the_raising_plugin():
    class Bad(Plugin):
        name = "bad"

        @hookimpl
        def posttrain_reward(self, completions):
            return 1 / 0

    with pytest.raises(PluginHookError, match="plugin 'bad' failed in hook 'posttrain_reward'"):
        score(PluginSet([_tag("a"), Bad()]), ["p"], ["x"], {})


def test_pluggy_call_names_the_raising_plugin():
    class Bad(Plugin):
        name = "bad"

        @hookimpl
        def posttrain_reference_needed(self, stage):
            raise KeyError("nope")

    with pytest.raises(PluginHookError, match="plugin 'bad' failed in hook 'posttrain_reference_needed'"):
        PluginSet([Bad()]).call("posttrain_reference_needed", stage="preference")


def test_class_checks():
    class NoName(Plugin):
        pass

    class WrongArg(Plugin):
        name = "wrong_arg"

        @hookimpl
        def posttrain_reward(self, completions, gold):
            return None

    with pytest.raises(ValueError, match="no `name`"):
        check_plugin_class(NoName)
    with pytest.raises(ValueError, match=r"takes argument\(s\) \['gold'\]"):
        check_plugin_class(WrongArg)
    with pytest.raises(ValueError, match="not a subclass"):
        check_plugin_class(object)


def test_every_hookspec_has_a_docs_section():

    doc = (REPO / "docs" / "hooks.md").read_text()
    specs = [n for n in dir(hookspecs) if n.startswith("posttrain_")]
    assert len(specs) >= 10
    missing = [n for n in specs if f"## `{n}`" not in doc]
    assert not missing, f"docs/hooks.md has no section for: {missing}"
    for name in specs:  # the combine rule is in every docstring
        assert "Combine:" in getattr(hookspecs, name).__doc__, name


def test_each_hook_declares_its_contract_on_its_spec():
    """The combine rule, pluggy's firstresult and the docstring's "Combine:" line are one declaration."""
    import re

    from posttrain import registry

    assert set(hookspecs.CONTRACTS) == set(registry.HOOK_NAMES)
    for hook, contract in hookspecs.CONTRACTS.items():
        spec = getattr(hookspecs, hook)
        said = re.search(r"Combine: \*([a-z ]+)\*", spec.__doc__)
        assert said and said.group(1) == contract.combine, hook
        firstresult = spec.posttrain_spec["firstresult"]
        assert firstresult == (contract.combine != hookspecs.ALL_RESULTS), hook
        assert contract.check(None) in (True, False)  # a check never raises on a foreign value
    assert "posttrain_preference_loss" in hookspecs.SINGLE_OWNER_HOOKS
    assert "posttrain_format_record" not in hookspecs.SINGLE_OWNER_HOOKS  # a format is named, not enabled
    from posttrain.stage import SETUP_HOOKS

    assert set(hookspecs.SUPPORTING_HOOKS) >= set(SETUP_HOOKS)


def test_single_owner_hooks_are_enforced_for_all_of_them(monkeypatch):
    from posttrain import registry

    def owner(hook, n):
        def impl(self, **kw):
            return None
        return type(f"Own{n}", (Plugin,), {"name": f"own{n}", hook: hookimpl(impl)})

    from posttrain.stage import Stage

    class Bare(Stage):  # a stage that calls every hook and needs none
        name = "bare"
        hooks = tuple(registry.HOOK_NAMES)

    for hook in hookspecs.SINGLE_OWNER_HOOKS:
        classes = {"own1": owner(hook, 1), "own2": owner(hook, 2)}
        monkeypatch.setattr(registry, "find_plugin",
                            lambda name: registry.PluginInfo(name, classes[name], "0", "test", "test"))
        with pytest.raises(UserError, match=f"'own1' and 'own2' both implement '{hook}'"):
            build_plugin_set({"own1": {}, "own2": {}}, Bare())


def test_every_builtin_plugin_has_a_methods_section_and_conforms():
    from posttrain.testing import assert_plugin_conforms

    doc = (REPO / "docs" / "methods.md").read_text()
    readme = (REPO / "README.md").read_text()
    found, _ = discover()
    builtin = [info for info in found.values() if info.distribution == "posttrain"]
    assert len(builtin) >= 9
    for info in builtin:
        assert f"## `{info.name}`" in doc, f"docs/methods.md has no section for {info.name}"
        assert f"| `{info.name}` |" in readme, f"README's methods table lacks {info.name}"
        for option in info.cls.options_schema():
            assert f"`{option['name']}`" in doc.split(f"## `{info.name}`")[1].split("\n## ")[0], \
                f"docs/methods.md does not document option {option['name']} of {info.name}"
        assert_plugin_conforms(info.cls)
