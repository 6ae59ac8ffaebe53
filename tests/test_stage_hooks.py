"""Each stage calls exactly the hooks its declaration lists (Stage.hooks): a short real run of every stage
on the tiny model, with plugins that give every conditional hook a reason to be called, records each hook
the run calls through the plugin set."""

import pytest
import yaml

from posttrain.stages import STAGES

WORDS = {"source": "builtin:word_problems", "options": {"n": 24}, "eval": {"fraction": 0.2}}
RUNS = {
    "sft": {"stage": "sft", "data": {"source": "builtin:arithmetic", "options": {"n": 48},
                                     "columns": {"completion": "chosen"}, "eval": {"fraction": 0.25}},
            "plugins": {"verify_gsm8k": {}, "trust_plugins:KeepAll": {}}},
    "reward_model": {"stage": "reward_model", "plugins": {}},
    "preference": {"plugins": {"dpo": {}, "rpo": {}, "ref_ema": {}, "verify_gsm8k": {}}},
    "online": {"stage": "online", "data": WORDS, "training": {"beta": 0.05, "num_generations": 4},
               "plugins": {"online_plugins:DigitShare": {}, "dynamic_sampling": {}, "critic": {}, "gae": {},
                           "advantage_norm": {}, "ref_ema": {}}},
    "iterative": {"stage": "iterative", "data": WORDS, "training": {"max_length": 512},
                  "plugins": {"dpo": {}, "online_plugins:DigitShare": {}, "ref_to_latest": {}, "best_vs_worst": {}},
                  "rounds": 1, "sampling": {"samples": 3, "prompts": 4, "max_new_tokens": 6}},
    "rejection_sampling": {"stage": "rejection_sampling", "data": {**WORDS, "eval": {"fraction": 0.0}},
                           "plugins": {"online_plugins:DigitShare": {}},
                           "sampling": {"samples": 2, "prompts": 4, "max_new_tokens": 4}},
    "kto": {"stage": "kto", "plugins": {"verify_gsm8k": {}}, "training": {"per_device_train_batch_size": 4}},
    "distillation": {"stage": "distillation", "teacher": "TINY_MODEL", "data": WORDS,
                     "plugins": {"online_plugins:DigitShare": {}}, "training": {"max_completion_length": 6}},
}


def test_every_stage_has_a_traced_run():
    assert set(RUNS) == set(STAGES)


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(RUNS))
def test_a_stage_calls_the_hooks_it_declares(stage, monkeypatch, tmp_path, tiny_model_dir, cli):
    from posttrain import plugin_set

    called = set()
    for method in ("call", "call_each", "call_one", "chain", "merged"):
        original = getattr(plugin_set.PluginSet, method)

        def traced(self, *args, _original=original, _method=method, **kwargs):
            called.add(args[1] if _method == "call_one" else args[0])
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(plugin_set.PluginSet, method, traced)
    recipe = {"model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
              "data": {"source": "builtin:arithmetic", "options": {"n": 48}, "eval": {"fraction": 0.25}},
              "eval": {"generate": 2, "max_new_tokens": 4}, **RUNS[stage]}
    if recipe.get("teacher") == "TINY_MODEL":
        recipe["teacher"] = str(tiny_model_dir)
    training = {"per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1, "save_strategy": "no",
                **({} if stage in ("online", "distillation") else {"max_length": 64}), **recipe.get("training", {})}
    if STAGES[stage].trains:
        recipe["training"] = training
    else:
        recipe["model"].pop("lora")
        recipe["eval"] = {"generate": 0}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, _, err = cli("run", path, "--output-dir", tmp_path / "run")
    assert code == 0, err
    declared = set(STAGES[stage].hooks)
    assert called - declared == set(), f"{stage} calls hooks it does not declare"
    assert declared - called == set(), f"{stage} declares hooks it never called"
