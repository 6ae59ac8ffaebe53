"""What a plugin author meets when a plugin misbehaves or is being written: hook results that break
their contract (named by plugin and hook), a plugin without @hookimpl, an online step on which every
reward source abstains, hook tracing, disabling a plugin from the command line, option errors that
name the field, the hint for a plugin whose entry point is missing, and the plugin author docs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import read_jsonl

TESTS = Path(__file__).resolve().parent


# --- abstention ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_step_on_which_every_completion_abstains_trains_and_logs(tmp_path, tiny_model_dir):
    """verify_gsm8k + group_relative on data whose gold answer is missing on most rows (2 prompts per
    step): some steps have no reward at all. They train (advantage 0: the loss is the KL term alone,
    here 0), log the reward as null and `rewards/unscored` as 1, and the run finishes; TRL's warning
    for such rows is replaced by that metric."""
    from posttrain.builtin import WordProblemOptions, word_problems

    rows = word_problems(WordProblemOptions(n=40, seed=1))
    for i, row in enumerate(rows):
        if i % 8:
            row["ground_truth"] = None
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "online", "seed": 42, "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 8}},
        "data": {"source": str(data), "eval": {"fraction": 0.0}},
        "plugins": {"verify_gsm8k": {}, "group_relative": {}},
        "training": {"per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 8,
                     "max_steps": 6, "logging_steps": 1, "save_strategy": "no", "learning_rate": 1e-4},
        "eval": {"generate": 0}}))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--output-dir", str(run)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "All reward functions returned None" not in proc.stderr
    steps = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    silent = [r for r in steps if r["reward"] is None]
    assert silent, "no step on which every completion abstained: change the data"
    for r in silent:
        assert r["rewards/unscored"] == 1.0 and r["advantages/abs_mean"] == 0.0 and r["loss"] == 0.0
    assert all(0 <= r["rewards/unscored"] <= 1 for r in steps)
    summary = json.loads((run / "summary.json").read_text())
    assert any(p["reward"] is None for p in summary["reward_curve"])


# --- hook results against their contract ---------------------------------------------------------


@pytest.mark.parametrize("plugin, got", [("online_plugins:TupleLoss", "tuple[3]"),
                                         ("online_plugins:ScalarLoss", "Tensor(shape=()")])
def test_a_loss_breaking_the_contract_is_the_plugins_error(cli, write_recipe, tmp_path, plugin, got):
    run = tmp_path / "run"
    code, _, err = cli("run", write_recipe(plugins={plugin: {}}, eval={"generate": 0}), "--output-dir", run)
    assert code == 2, err
    name = plugin.split(":")[1].replace("Loss", "_loss").lower()
    assert f"plugins.{name}: plugin '{name}' must return" in err and f"; it returned {got}" in err
    assert "from hook 'posttrain_preference_loss'; it returned" in err and "PreferenceLoss" in err
    assert err.index("PreferenceLoss") < err.index(got)  # what was expected comes first
    if "Scalar" in plugin:
        assert "shape (8,)" in err  # one loss per pair of the batch
    assert "internal error" not in err
    assert not run.exists()  # removed, as for other hook errors


def test_reward_of_the_wrong_type_is_refused_naming_the_plugin():
    from posttrain import Plugin, hookimpl
    from posttrain.plugin_set import PluginSet
    from posttrain.rewards import score
    from posttrain.errors import UserError

    class Words(Plugin):
        name = "words"

        @hookimpl
        def posttrain_reward(self, completions):
            return ["good" for _ in completions]

    with pytest.raises(UserError, match=r"plugin 'words' must return .* from hook 'posttrain_reward'; it returned list\[2\]\('good'"):
        score(PluginSet([Words()]), ["p", "q"], ["x", "y"], {})


# --- plugins without hooks -----------------------------------------------------------------------


def test_a_plugin_without_hookimpl_is_refused(cli, write_recipe, third_party):
    code, out, _ = cli("plugins", "--json")
    failed = {f["name"]: f["reason"] for f in json.loads(out)["failed"]}
    assert "implements no hook" in failed["acme_unmarked"] and "posttrain_reward" in failed["acme_unmarked"]
    assert "acme_unmarked" not in {p["name"] for p in json.loads(out)["plugins"]}
    code, _, err = cli("validate", write_recipe(plugins={"dpo": {}, "acme_unmarked": {}}))
    assert code == 2 and "failed to load" in err and "lack the @hookimpl marker" in err
    import acme_posttrain
    from posttrain.testing import assert_plugin_conforms

    with pytest.raises(AssertionError, match="implements no hook"):
        assert_plugin_conforms(acme_posttrain.AcmeUnmarked)


# --- tracing -------------------------------------------------------------------------------------


def test_trace_prints_the_validation_time_hooks(cli, write_recipe, online_recipe, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_TRACE_HOOKS", "1")
    code, _, err = cli("validate", write_recipe(plugins={"tpo": {}}, data={"options": {"n": 96, "reference": True}}))
    assert code == 0, err
    assert "posttrain hook: tpo.posttrain_required_columns() -> list[1]('reference')" in err
    recipe = online_recipe(plugins={"online_plugins:DigitShare": {}, "group_relative": {}, "ref_ema": {},
                                    "large_batch": {"prompts_per_update": 4}}, training={"beta": 0.05})
    code, _, err = cli("validate", recipe)
    assert code == 0, err
    assert "posttrain hook: large_batch.posttrain_trl_config(stage='online', recipe={" in err
    assert "posttrain hook: ref_ema.posttrain_reference_needed() -> True" in err


def test_trace_covers_reward_calls(capsys, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_TRACE_HOOKS", "1")
    from posttrain.plugins.verify_gsm8k import VerifyGSM8K
    from posttrain.plugin_set import PluginSet
    from posttrain.rewards import score

    score(PluginSet([VerifyGSM8K()]), ["p"], ["= 4"], {"ground_truth": ["4"]})
    err = capsys.readouterr().err
    assert "posttrain hook: verify_gsm8k.posttrain_reward(" in err and "-> list[1](10.0)" in err


# --- the command line and recipe errors ----------------------------------------------------------


def test_unset_disables_a_plugin(cli, write_recipe):
    recipe = write_recipe(plugins={"dpo": {}, "rpo": {"alpha": 0.5}})
    code, out, err = cli("validate", recipe, "--unset", "plugins.rpo")
    assert code == 0, err
    assert "plugin:   dpo" in out and "rpo" not in out
    code, _, err = cli("validate", recipe, "--unset", "plugins.ref_ema")
    assert code == 2 and "--unset plugins.ref_ema" in err and "no key" in err


def test_plugin_options_as_a_list_name_the_plugin(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"dpo": [0.1]}))
    assert code == 2 and "plugins.dpo:" in err and "expected a mapping of options, got list" in err


def test_unknown_plugin_explains_entry_points(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"odds_ratio": {}}))
    assert code == 2
    assert "posttrain.plugins" in err and "entry point" in err and "editable install" in err
    assert "module:ClassName" in err


def test_plugins_listing_shows_option_help(cli):
    code, out, _ = cli("plugins")
    assert code == 0
    assert "beta: float = 0.1  -  Inverse temperature" in out


# --- docs a plugin author reads -----------------------------------------------------------------


def test_plugin_author_docs_are_complete_and_runnable():
    import re

    from conftest import REPO

    plugins_md = (REPO / "docs" / "plugins.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", plugins_md, re.S):
        if "pytest." in block:
            assert "import pytest" in block, block[:200]
    assert "build_tiny_model(" in plugins_md  # a plugin author needs it to run a recipe on a model of their own
    assert "float64" in plugins_md  # what make_logps returns
    loss_section = plugins_md.split("## A loss plugin, from zero")[1].split("\n## ")[0]
    assert "posttrain_reference_needed" in loss_section and "return False" in loss_section
    hooks_md = (REPO / "docs" / "hooks.md").read_text()
    assert '"rpo_nll"' in hooks_md and '{"nll"' not in hooks_md  # the name the rpo plugin logs


def test_the_screen_summary_shows_each_reward_sources_mean_when_there_are_several(capsys):
    """With a reward model and a verifier the accuracy row counts positive weighted totals; each
    source's own row says which one moved."""
    from posttrain.cli import _print_metrics

    def answers(rm, gsm8k):
        return {"answers": {"answer_accuracy": 0.5, "mean_reward": rm,
                            "by_source": {"reward_model": rm, "verify_gsm8k": gsm8k}}}

    _print_metrics({"before": answers(0.448, 0.825), "after": answers(0.351, 0.6)})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[-2:] for line in lines if "greedy answers," in line] == [["0.448", "0.351"], ["0.825", "0.600"]]

    one = {"answers": {"answer_accuracy": 0.5, "mean_reward": 0.5, "by_source": {"verify_gsm8k": 0.5}}}
    _print_metrics({"before": one, "after": one})
    assert "greedy answers," not in capsys.readouterr().out


def test_a_transform_returning_rows_says_what_was_expected_first():
    import datasets
    from posttrain import Plugin, hookimpl
    from posttrain.errors import UserError
    from posttrain.plugin_set import PluginSet

    class Rows(Plugin):
        name = "rows"

        @hookimpl
        def posttrain_transform_dataset(self, dataset):
            return dataset.to_list()

    data = datasets.Dataset.from_list([{"prompt": f"question {i} " * 20, "chosen": "a", "rejected": "b"}
                                       for i in range(5)])
    with pytest.raises(UserError) as caught:
        PluginSet([Rows()]).chain("posttrain_transform_dataset", "dataset", data, split="train", stage="preference")
    message = str(caught.value)
    assert message.startswith("plugins.rows: plugin 'rows' must return a datasets.Dataset")
    assert message.index("must return") < message.index("it returned list[5]") < message.index("question 0")
