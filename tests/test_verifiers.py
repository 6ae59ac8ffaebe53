"""Reward verifiers: right answers score α, wrong ones 0, and hostile completions score 0 within
the time bound without breaking anything, also when called off the main thread."""

import threading
import time

import pytest

from posttrain.plugins.verify_gsm8k import VerifyGSM8K
from posttrain.plugins.verify_math import VerifyMath

NESTED = "\\boxed{" + "\\frac{1}{" * 3000 + "2" + "}" * 3000 + "}"
HOSTILE = {
    "1MB of text": "the answer is maybe " * 55_000,
    "9**9**9**9": "so the result is 9**9**9**9",
    "latex power tower": "\\boxed{9^{9^{9^{9}}}}",
    "deeply nested latex": NESTED,
    "invalid utf-8": b"\xff\xfe\xfa answer \xc3\x28 \xed\xa0\x80".decode("utf-8", "surrogateescape"),
    "empty": "",
}


@pytest.fixture(scope="module")
def math_plugin():
    plugin = VerifyMath(VerifyMath.Options(alpha=10.0, timeout_seconds=2.0))
    assert plugin.posttrain_reward(["\\boxed{1}"], {"ground_truth": ["1"]}) == [10.0]  # warm the worker up
    return plugin


@pytest.mark.parametrize("gold,answer,expected", [
    ("3/4", "so it is \\boxed{0.75}", 10.0),
    ("$\\frac{1}{2}$", "The final answer is $0.5$", 10.0),
    ("#### 42", "Adding up gives 42", 10.0),
    ("$2\\sqrt{2}$", "\\boxed{\\sqrt{8}}", 10.0),
    ("5", "\\boxed{6}", 0.0),
    ("5", "I do not know", 0.0),
])
def test_math_equivalence(math_plugin, gold, answer, expected):
    assert math_plugin.posttrain_reward([answer], {"ground_truth": [gold]}) == [expected]


def test_math_abstains_without_gold(math_plugin):
    assert math_plugin.posttrain_reward(["\\boxed{1}"], {}) is None
    assert math_plugin.posttrain_reward(["\\boxed{1}", "\\boxed{2}"], {"ground_truth": [None, "2"]}) == [None, 10.0]


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_completions_score_zero_in_bounded_time(math_plugin, name):
    completion = HOSTILE[name]
    started = time.monotonic()
    assert math_plugin.posttrain_reward([completion], {"ground_truth": ["7"]}) == [0.0]
    assert time.monotonic() - started < 2.0 + 1.5  # the time limit, plus killing the worker
    assert VerifyGSM8K(VerifyGSM8K.Options()).posttrain_reward([completion], {"ground_truth": ["7"]}) == [0.0]
    # and the next ordinary answer is scored normally
    assert math_plugin.posttrain_reward(["\\boxed{7}"], {"ground_truth": ["7"]}) == [10.0]


def test_hostile_check_off_the_main_thread(math_plugin):
    results = []
    thread = threading.Thread(target=lambda: results.append(
        math_plugin.posttrain_reward([HOSTILE["latex power tower"]], {"ground_truth": ["3"]})))
    started = time.monotonic()
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive() and results == [[0.0]]
    assert time.monotonic() - started < 2.0 + 1.5


def test_gsm8k_hostile_bytes_and_non_strings():
    plugin = VerifyGSM8K(VerifyGSM8K.Options(alpha=1.0))
    odd = [None, 12345, [{"role": "assistant", "content": "it is 7"}], {"content": "7"}]
    assert plugin.posttrain_reward(odd, {"ground_truth": ["7"] * 4}) == [0.0, 0.0, 1.0, 1.0]


def test_missing_package_is_reported_with_the_install_command(monkeypatch):
    from posttrain.registry import check_plugin_class

    monkeypatch.setattr(VerifyMath, "requires", {"no_such_module_xyz": "no-such-package"})
    with pytest.raises(ValueError, match="needs no-such-package: pip install 'no-such-package'"):
        check_plugin_class(VerifyMath)
