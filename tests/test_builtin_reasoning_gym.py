"""reasoning-gym as a built-in source of verifiable prompts (optional: skipped where it is not installed)."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction

import pytest
from posttrain.builtin import reasoning_gym as brg
from posttrain.builtin.reasoning_gym import ReasoningGymOptions, columns, reasoning_gym_tasks, task_names
from posttrain.errors import UserError
from posttrain.plugin import parse_options
from posttrain.plugins.verify_gsm8k import last_number

# basic_arithmetic made small enough for a 135M model (no '/': see the module docstring).
EASY_ARITHMETIC = {"max_terms": 2, "max_digits": 2, "operators": ["+", "-"], "allow_parentheses": False,
                   "allow_negation": False}


@pytest.fixture(scope="module")
def rg():
    return pytest.importorskip("reasoning_gym")


# -- without reasoning-gym -------------------------------------------------------------------------

def test_installed_check_does_not_import_it():
    code = ("import sys; from posttrain.builtin.reasoning_gym import reasoning_gym_installed as f; "
            "print(f(), 'reasoning_gym' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False"
    assert out[0] in ("True", "False")


def test_missing_package_is_a_clear_validation_error(monkeypatch):
    monkeypatch.setattr(brg, "reasoning_gym_installed", lambda: False)
    with pytest.raises(ValueError, match="reasoning-gym package is not installed: pip install 'reasoning-gym"):
        ReasoningGymOptions(n=4).validate()
    with pytest.raises(UserError, match="not installed"):
        parse_options(ReasoningGymOptions, {"n": 4}, where="data.options", owner="built-in dataset 'reasoning_gym'")


def test_cheap_checks_come_first():
    with pytest.raises(ValueError, match="n must be at least 1"):
        ReasoningGymOptions(n=0).validate()
    with pytest.raises(ValueError, match="must not set seed, size: use the options n and seed"):
        ReasoningGymOptions(config={"size": 3, "seed": 1}).validate()


# -- with reasoning-gym ----------------------------------------------------------------------------

def test_task_names(rg):
    names = task_names()
    assert {"gsm_symbolic", "basic_arithmetic", "chain_sum"} <= set(names)
    assert "composite" not in names
    assert names == sorted(names)


def test_records_columns_and_prompt_forms(rg):
    options = ReasoningGymOptions(n=5, seed=3)
    records = reasoning_gym_tasks(options)
    assert len(records) == 5
    for r in records:
        assert list(r) == columns(options) == ["prompt", "ground_truth", "task"]
        assert r["task"] == "gsm_symbolic"
        assert isinstance(r["ground_truth"], str) and r["ground_truth"]
        [message] = r["prompt"]
        assert message["role"] == "user"
        assert message["content"].endswith("\n" + brg.DEFAULT_INSTRUCTION)

    plain = reasoning_gym_tasks(ReasoningGymOptions(n=5, seed=3, conversational=False, instruction=""))
    for r, p in zip(records, plain):
        question = r["prompt"][0]["content"].removesuffix("\n" + brg.DEFAULT_INSTRUCTION)
        assert p["prompt"] == f"Question: {question}\nAnswer:"
        assert p["ground_truth"] == r["ground_truth"]

    with_meta = reasoning_gym_tasks(ReasoningGymOptions(n=2, seed=3, metadata=True))
    assert list(with_meta[0]) == ["prompt", "ground_truth", "task", "metadata"]
    meta = json.loads(with_meta[0]["metadata"])
    assert meta["source_dataset"] == "gsm_symbolic" and meta["source_index"] == 0


def test_deterministic_for_a_seed(rg):
    options = ReasoningGymOptions(task="chain_sum", n=20, seed=7)
    first = reasoning_gym_tasks(options)
    assert reasoning_gym_tasks(ReasoningGymOptions(task="chain_sum", n=20, seed=7)) == first
    assert reasoning_gym_tasks(ReasoningGymOptions(task="chain_sum", n=20, seed=8)) != first
    # The first items do not depend on n.
    assert reasoning_gym_tasks(ReasoningGymOptions(task="chain_sum", n=5, seed=7)) == first[:5]


def test_import_leaves_the_global_random_state_alone(rg):
    # In a fresh process: importing reasoning-gym (through `rich`) draws from the global generator.
    code = ("import random; random.seed(0); a = random.random(); random.seed(0); "
            "from posttrain.builtin.reasoning_gym import task_names; task_names(); print(random.random() == a)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "True"


def test_validation_errors(rg):
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'gsm_symbolc' \\(did you mean 'gsm_symbolic'"):
        ReasoningGymOptions(task="gsm_symbolc").validate()
    with pytest.raises(ValueError, match="unknown config field 'max_digit' .*did you mean 'max_digits'"):
        ReasoningGymOptions(task="basic_arithmetic", config={"max_digit": 2}).validate()
    with pytest.raises(ValueError, match="invalid config for reasoning-gym task 'basic_arithmetic'"):
        ReasoningGymOptions(task="basic_arithmetic", config={"operators": ["+", "^"]}).validate()
    # A task without a single gold answer cannot fill ground_truth.
    with pytest.raises(ValueError, match="no single gold answer"):
        reasoning_gym_tasks(ReasoningGymOptions(task="boxnet", n=2))


def test_recipe_options_with_task_config(rg):
    raw = {"task": "basic_arithmetic", "n": 30, "seed": 1, "config": EASY_ARITHMETIC}
    options = parse_options(ReasoningGymOptions, raw, where="data.options", owner="built-in dataset 'reasoning_gym'")
    records = reasoning_gym_tasks(options)
    for r in records:
        question = r["prompt"][0]["content"].splitlines()[0]  # "Calculate 4 - 1."
        a, op, b = question.removeprefix("Calculate ").rstrip(".").split()
        assert op in "+-" and len(a) <= 2 and len(b) <= 2
        assert int(r["ground_truth"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    with pytest.raises(UserError, match="data.options: unknown config field"):
        parse_options(ReasoningGymOptions, {"task": "basic_arithmetic", "config": {"digits": 2}},
                      where="data.options", owner="built-in dataset 'reasoning_gym'")


def test_records_make_a_dataset(rg):
    datasets = pytest.importorskip("datasets")
    records = reasoning_gym_tasks(ReasoningGymOptions(n=6, metadata=True))
    ds = datasets.Dataset.from_list(records)
    assert ds.column_names == ["prompt", "ground_truth", "task", "metadata"]
    assert ds[0]["prompt"] == records[0]["prompt"]


def test_gsm8k_rule_agrees_with_reasoning_gym_on_gsm_symbolic_golds(rg):
    """The last-number rule (verify_gsm8k) on each gold answer says what reasoning-gym's scorer says.

    Seed 19 includes a decimal gold (index 106) and a negative one (index 6). reasoning-gym 0.1.25's
    gsm_symbolic scorer reads the first number with r"\\b-?\\d+..." and so drops a leading minus: it
    scores a negative gold 0.01 against itself. That is its bug, the only disagreement allowed here.
    """
    n, seed = 120, 19
    records = reasoning_gym_tasks(ReasoningGymOptions(task="gsm_symbolic", n=n, seed=seed))
    dataset = rg.create_dataset("gsm_symbolic", size=n, seed=seed)
    disagree = []
    for index, record in enumerate(records):
        entry = dataset[index]
        gold = record["ground_truth"]
        assert gold == entry["answer"]
        want = last_number(gold)
        assert want is not None and want == Fraction(gold), gold  # a plain number, read exactly
        assert want == Fraction(str(entry["metadata"]["answer_value"]))
        rule_right = last_number(f"Some working: 3 + 4 = 7.\nThe answer is\n{gold}") == want
        own_right = dataset.score_answer(gold, entry) == 1.0
        if rule_right != own_right:
            disagree.append(gold)
    assert all(gold.startswith("-") for gold in disagree), disagree
