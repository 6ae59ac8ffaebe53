"""Scoring completions outside a run: posttrain.load_plugin and posttrain.score, with real verifiers,
the same scores as the reward function a run hands TRL, and the example of docs/plugins.md."""

import contextlib
import io
import re
from pathlib import Path

import pytest

import posttrain
from posttrain import UserError
from posttrain.plugin_set import PluginSet
from posttrain.rewards import RewardSource, score_completions
from posttrain.rewards import score as score_all_sources

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


@pytest.fixture(scope="module")
def math_checker():
    plugin = posttrain.load_plugin("verify_math", alpha=1.0, timeout_seconds=2.0, workers=1)
    yield plugin
    plugin.close()


def test_exported():
    assert posttrain.score is score_completions
    assert {"load_plugin", "score"} <= set(posttrain.__all__)


def test_load_plugin_checks_options_as_a_recipe_does():
    plugin = posttrain.load_plugin("verify_gsm8k", alpha=2.0, only_if={"dataset": ["gsm8k"]})
    assert plugin.name == "verify_gsm8k" and plugin.options.alpha == 2.0
    assert plugin.options.only_if == {"dataset": ["gsm8k"]} and plugin.options.column == "ground_truth"
    assert isinstance(posttrain.load_plugin("verify_gsm8k", alpha=3).options.alpha, float)  # ints widen, as in YAML
    with pytest.raises(UserError, match="did you mean 'alpha'") as bad_key:
        posttrain.load_plugin("verify_gsm8k", alpah=2.0)
    assert bad_key.value.field == "plugins.verify_gsm8k.alpah"
    with pytest.raises(UserError, match="expected float") as bad_type:
        posttrain.load_plugin("verify_gsm8k", alpha="ten")
    assert bad_type.value.field == "plugins.verify_gsm8k.alpha"
    with pytest.raises(UserError, match="workers must be between 1 and 64") as bad_value:
        posttrain.load_plugin("verify_math", workers=0)
    assert bad_value.value.field.startswith("plugins.verify_math")
    with pytest.raises(UserError, match="unknown plugin 'verify_gsm9k'.*verify_gsm8k"):
        posttrain.load_plugin("verify_gsm9k")
    # by import path, as a recipe may name it
    assert posttrain.load_plugin("posttrain.plugins.verify_gsm8k:VerifyGSM8K").name == "verify_gsm8k"


def test_score_by_name_and_instance(math_checker):
    assert posttrain.score("verify_gsm8k", ["it is 42", "it is 41", "x"], ground_truth=["42", "42", None]) == \
        [10.0, 0.0, None]
    assert posttrain.score(math_checker, [r"\boxed{2\sqrt{2}}", r"\boxed{x^2+2x+1}", r"\boxed{5}"],
                           ground_truth=[r"\sqrt{8}", "(x+1)^2", "6"]) == [1.0, 1.0, 0.0]
    # only_if reads another column; a batch without the gold column: every completion abstains
    gsm = posttrain.load_plugin("verify_gsm8k", only_if={"dataset": ["gsm8k"]})
    assert posttrain.score(gsm, ["7", "7"], ground_truth=["7", "7"], dataset=["gsm8k", "MATH"]) == [10.0, None]
    assert posttrain.score(gsm, ["7", "7"]) == [None, None]
    assert posttrain.score("verify_gsm8k", []) == []


def test_same_scores_as_in_a_run(math_checker):
    """posttrain.score gives what the run's reward function (TRL's view) and the weighted sum see."""
    completions = [r"\boxed{\frac{1}{2}}", "0.5", r"\boxed{3}", "nothing"]
    columns = {"ground_truth": ["1/2", r"\frac12", "4", None]}
    prompts = ["q"] * 4
    plugins = PluginSet([math_checker])
    as_trl = RewardSource(plugins, "verify_math")(prompts, completions, trainer_state=None, **columns)
    total = score_all_sources(plugins, prompts, completions, columns)
    assert posttrain.score(math_checker, completions, prompts, **columns) == as_trl == \
        total.by_source["verify_math"] == [1.0, 1.0, 0.0, None]


@pytest.mark.slow
def test_score_with_prompts():
    """verify_ifeval reads the prompt (repeat_prompt), and ids + kwargs from one gold column."""
    checker = posttrain.load_plugin("verify_ifeval", workers=1)
    try:
        request = "Write a haiku about tea."
        gold = {"instruction_id_list": ["combination:repeat_prompt"], "kwargs": [{}]}
        assert posttrain.score(checker, [f"{request}\nGreen leaves.", "Green leaves."], prompts=[request, request],
                               ground_truth=[gold, gold]) == [10.0, 0.0]
    finally:
        checker.close()


def test_mistakes_are_user_errors():
    with pytest.raises(UserError, match="2 value") as wrong_length:
        posttrain.score("verify_gsm8k", ["1", "2", "3"], ground_truth=["1", "2"])
    assert wrong_length.value.field == "columns.ground_truth"
    with pytest.raises(UserError, match="one value per completion") as scalar:
        posttrain.score("verify_gsm8k", ["1"], ground_truth="1")
    assert scalar.value.field == "columns.ground_truth"
    with pytest.raises(UserError, match="not a single string"):
        posttrain.score("verify_gsm8k", "it is 1", ground_truth=["1"])
    with pytest.raises(UserError, match="1 value") as prompts:
        posttrain.score("verify_gsm8k", ["1", "2"], prompts=["p"], ground_truth=["1", "2"])
    assert prompts.value.field == "prompts"
    with pytest.raises(UserError, match="'dpo' is not a reward source"):
        posttrain.score("dpo", ["1"])
    with pytest.raises(TypeError):
        posttrain.score(object(), ["1"])


def test_the_example_in_docs_plugins_md_runs():
    text = DOCS.read_text()
    section = text.split("## Scoring completions outside a run")[1].split("\n## ")[0]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    expected = [line[2:] for line in code.splitlines() if line.startswith("# [")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOCS), "exec"), {"__name__": "docs_example"})  # noqa: S102 - our own docs
    assert out.getvalue().splitlines() == expected and len(expected) == 2
