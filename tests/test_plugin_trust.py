"""Plugin trust and reproducibility: no package takes a built-in's plugin name or silently wins a
shared one, no hook left unmarked is silently dropped, sampling is seeded, engine options are checked
before loading, and the messages an author's mistakes get."""

import json

import pytest
import yaml
from conftest import make_distribution, read_jsonl

from posttrain import registry

IMPOSTOR = '''
from posttrain import Plugin, PreferenceLoss, hookimpl


class Impostor(Plugin):
    name = "{name}"
    description = "a loss that claims another plugin's name"

    @hookimpl
    def posttrain_preference_loss(self, logps):
        import torch

        margin = logps.chosen_logratios - logps.rejected_logratios
        return PreferenceLoss(torch.relu(1.0 - margin), margin.detach(), 0 * margin.detach())
'''


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path where tests lay out installed distributions (dist-info with entry points)."""
    import os
    import sys

    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    registry.clear_cache()
    yield folder
    for name in list(sys.modules):
        if name.startswith(("evil_", "acme_one", "acme_two")):
            sys.modules.pop(name)
    registry.clear_cache()


def test_a_package_cannot_take_a_builtin_plugin_name(cli, write_recipe, site):
    make_distribution(site, "evil-posttrain", "6.6.6", IMPOSTOR.format(name="dpo"),
                      {"dpo": "evil_posttrain:Impostor"})
    code, out, err = cli("plugins")
    assert code == 2
    assert "CONFLICT dpo" in out and "evil-posttrain: evil_posttrain:Impostor" in out
    assert "posttrain: posttrain.plugins.dpo:DPO  <- used" in out and "uninstall" in err
    code, out, _ = cli("plugins", "--json")
    data = json.loads(out)
    assert code == 2
    assert next(p for p in data["plugins"] if p["name"] == "dpo")["distribution"] == "posttrain"
    (conflict,) = data["conflicts"]
    assert conflict["used"] == {"distribution": "posttrain", "entry_point": "posttrain.plugins.dpo:DPO"}
    assert {p["distribution"] for p in conflict["providers"]} == {"posttrain", "evil-posttrain"}
    # a recipe using the name gets the built-in, and is told about the other package
    from posttrain.pipeline import load_recipe
    from posttrain.validate import validate

    plan = validate(load_recipe(write_recipe()))
    assert type(plan.plugins.by_name["dpo"]).__module__ == "posttrain.plugins.dpo"
    code, _, err = cli("validate", write_recipe())
    assert code == 0 and "evil-posttrain" in err and "the built-in is used" in err


def test_two_packages_registering_one_name_are_refused_naming_both(cli, write_recipe, site):
    make_distribution(site, "acme-one", "1.0", IMPOSTOR.format(name="hinge"), {"hinge": "acme_one:Impostor"})
    make_distribution(site, "acme-two", "2.0", IMPOSTOR.format(name="hinge"), {"hinge": "acme_two:Impostor"})
    code, out, _ = cli("plugins")
    assert code == 2 and "CONFLICT hinge" in out and "acme-one" in out and "acme-two" in out
    assert not any(line.startswith("hinge ") for line in out.splitlines())  # nobody gets the name
    code, _, err = cli("validate", write_recipe(plugins={"hinge": {}}))
    assert code == 2 and "plugins.hinge" in err
    assert "acme-one (acme_one:Impostor)" in err and "acme-two (acme_two:Impostor)" in err
    assert "uninstall" in err and "import path" in err
    code, _, err = cli("validate", write_recipe(plugins={"acme_two:Impostor": {}}))  # the way out
    assert code == 0, err


def test_a_hook_left_unmarked_beside_a_marked_one_is_refused(cli, write_recipe, online_recipe, site):
    code, _, err = cli("validate", online_recipe(plugins={"trust_plugins:HalfMarked": {}, "group_relative": {}}))
    assert code == 2 and "posttrain_reward" in err and "lack the @hookimpl marker" in err
    assert "decorate each hook method with @hookimpl" in err
    # the same class installed through an entry point is listed as failed, and a recipe naming it is refused
    make_distribution(site, "evil-half", "0.1", "from trust_plugins import HalfMarked\n",
                      {"half_marked": "evil_half:HalfMarked"})
    code, out, _ = cli("plugins")
    assert "FAILED half_marked" in out and "posttrain_reward" in out
    code, _, err = cli("validate", online_recipe(plugins={"half_marked": {}, "group_relative": {}}))
    assert code == 2 and "failed to load" in err and "decorate each hook method with @hookimpl" in err


def test_a_plugin_with_no_marked_hook_is_told_what_to_add(cli, online_recipe):
    code, _, err = cli("validate", online_recipe(plugins={"trust_plugins:Unmarked": {}, "group_relative": {}}))
    assert code == 2 and "implements no hook" in err and "posttrain_reward" in err
    assert "decorate each hook method with @hookimpl" in err and "check the import path" not in err


def test_the_wrong_number_of_rewards_names_the_hook(online_recipe, tmp_path, cli):
    from posttrain import score
    from posttrain.errors import UserError
    from trust_plugins import ShortRewards

    with pytest.raises(UserError) as caught:
        score(ShortRewards(), ["a", "b", "c"])
    message = str(caught.value.render())
    assert "'short_rewards' returned 2 rewards for 3 completions from hook 'posttrain_reward'" in message
    assert "docs/hooks.md" in message


def test_a_required_option_is_shown_as_required(cli):
    code, out, _ = cli("plugins")
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("reward_model "))
    line = next(line for line in lines[start:] if line.strip().startswith("options:"))
    assert "(required)" in line and "<required>" not in out
    data = json.loads(cli("plugins", "--json")[1])
    model = next(o for o in next(p for p in data["plugins"] if p["name"] == "reward_model")["options"]
                 if o["name"] == "model")
    assert model["required"] is True and model["default"] is None


# -- reproducible sampling -------------------------------------------------------------------------


def _iterative(tiny_model_dir, tmp_path, name, seed=3):
    data = {"stage": "iterative", "seed": seed, "name": name,
            "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                      "dtype": "float32"},
            "data": {"source": "builtin:word_problems", "options": {"n": 24}, "eval": {"fraction": 0.2}},
            "plugins": {"dpo": {"beta": 0.1}, "online_plugins:DigitShare": {}},
            "rounds": 1, "sampling": {"samples": 3, "prompts": 6, "max_new_tokens": 8, "batch_size": 4},
            "training": {"per_device_train_batch_size": 4, "max_steps": 1, "logging_steps": 1, "save_strategy": "no",
                         "max_length": 512},
            "eval": {"generate": 0}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.slow
def test_an_iterative_round_samples_the_same_completions_with_the_same_seed(cli, tiny_model_dir, tmp_path):
    samples = {}
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        code, _, err = cli("run", _iterative(tiny_model_dir, tmp_path, f"it-{run}", seed), "--output-dir",
                           tmp_path / run)
        assert code == 0, err
        samples[run] = [s["completions"] for s in read_jsonl(tmp_path / run / "round-01" / "samples.jsonl")]
    assert samples["a"] == samples["b"]
    assert samples["a"] != samples["c"]  # another seed, other samples (the test can tell them apart)
    from posttrain.trainers.iterative import round_seed

    for run, seed in (("a", 3), ("c", 4)):
        counts = json.loads((tmp_path / run / "round-01" / "counts.json").read_text())
        assert counts["seed"] == round_seed(seed, 1)
        assert json.loads((tmp_path / run / "round-01" / "round.json").read_text())["seed"] == round_seed(seed, 1)
    assert round_seed(3, 1) != round_seed(3, 2)  # each round its own seed


def test_held_out_generation_gives_the_sampler_a_list(write_recipe, tmp_path):
    from posttrain.testing import run_recipe
    from trust_plugins import PromptKinds

    PromptKinds.seen.clear()
    run_recipe({"plugins": {"dpo": {}, "trust_plugins:PromptKinds": {}, "verify_gsm8k": {}},
                "eval": {"generate": 4, "max_new_tokens": 4}}, steps=1, output_dir=tmp_path / "run")
    assert PromptKinds.seen and set(PromptKinds.seen) == {"list"}


# -- the engine options are checked before loading ---------------------------------------------------


def test_use_vllm_is_checked_before_loading(cli, online_recipe, write_recipe):
    code, _, err = cli("validate", online_recipe(training={"use_vllm": True}))
    assert code == 2 and "training.use_vllm" in err and "vllm" in err
    code, _, err = cli("validate", online_recipe(training={"vllm_mode": "server"}))
    assert code == 2 and "training.vllm_mode" in err and "no effect without use_vllm" in err
    code, _, err = cli("validate", write_recipe(training={"use_vllm": True}))  # the preference stage has no engine
    assert code == 2 and "training.use_vllm" in err and "DPOConfig has no field" in err


# -- what the run directory says about the run -------------------------------------------------------


@pytest.mark.slow
def test_the_model_card_names_the_loss_that_trained(write_recipe, cli, tmp_path):
    recipe = write_recipe(plugins={"trust_plugins:Hinge": {}}, training={"max_steps": 2, "save_steps": 2})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    card = (tmp_path / "run" / "README.md").read_text()
    assert "trained with posttrain's preference stage on TRL's DPOTrainer (loss: hinge" in card
    assert "trained with DPO" not in card and "Direct Preference Optimization" not in card
    code, _, err = cli("run", write_recipe(training={"max_steps": 2, "save_steps": 2}), "--output-dir", tmp_path / "b")
    assert code == 0, err
    assert "(loss: dpo; plugins: dpo)" in (tmp_path / "b" / "README.md").read_text()


def test_a_transform_says_why_it_dropped_rows(tmp_path):
    from datasets import Dataset

    from posttrain.pipeline import recipe_from_data
    from posttrain.plugin_set import build_plugin_set
    from posttrain.trainers.parts import transform
    from posttrain.validate import Plan

    recipe = recipe_from_data({"model": {"name_or_path": "x"}, "data": {"source": "x"}})
    plugins = build_plugin_set({"dpo": {}, "keep_rows": {"column": "kind", "values": ["a"]}}, recipe.kind)
    plan = Plan(recipe, plugins, {})
    out = transform(plan, Dataset.from_dict({"kind": ["a", "b", "a", "c"]}), "train")
    assert len(out) == 2
    assert plan.data_log == [{"plugin": "keep_rows", "split": "train", "rows_in": 4, "rows_out": 2,
                              "reason": "kind not in ['a']"}]


def test_the_hooks_page_lists_every_stage_with_the_hooks_it_calls():
    import re

    from conftest import REPO
    from posttrain.stages import STAGES

    doc = (REPO / "docs" / "hooks.md").read_text()
    rows = dict(re.findall(r"^  \| `(\w+)` \| (`.+`) \|$", doc, flags=re.M))
    assert set(rows) == set(STAGES)
    for name, stage in STAGES.items():
        listed = re.findall(r"`(\w+)`", rows[name])
        assert sorted(listed) == sorted(h.removeprefix("posttrain_") for h in stage.hooks), name


def test_a_plugin_whose_entry_point_failed_is_named_with_the_failure(cli, write_recipe, site):
    """The recipe names the class's own name ('mismatch'), the package registers it as 'mismatch_ep': the error
    says that entry point failed to load and why, not just 'unknown plugin'."""
    make_distribution(site, "acme-one", "1.0", IMPOSTOR.format(name="mismatch"), {"mismatch_ep": "acme_one:Impostor"})
    code, _, err = cli("validate", write_recipe(plugins={"mismatch": {}}))
    assert code == 2 and "plugins.mismatch: unknown plugin 'mismatch'" in err
    assert "the installed entry point 'mismatch_ep' (acme-one, acme_one:Impostor) failed to load" in err
    assert "entry point is named 'mismatch_ep' but the plugin calls itself 'mismatch'" in err
    assert "give the entry point and the class's `name` the same name" in err
