"""Reward verifiers: right answers score α, wrong ones 0, and hostile completions score 0 within
the time bound without breaking anything, also when called off the main thread. The four
verifiers are one family: the same base class and the same common options."""

import dataclasses
import os
import subprocess
import sys
import threading
import time

import pytest

from posttrain.plugins.verify_code import VerifyCode
from posttrain.plugins.verify_gsm8k import VerifyGSM8K
from posttrain.plugins.verify_ifeval import VerifyIFEval
from posttrain.plugins.verify_math import VerifyMath, final_answer_text, gold_readings, in_words
from posttrain.verifier import Verifier

NESTED = "\\boxed{" + "\\frac{1}{" * 3000 + "2" + "}" * 3000 + "}"
HOSTILE = {
    "1MB of text": "the answer is maybe " * 55_000,
    "9**9**9**9": "so the result is 9**9**9**9",
    "latex power tower": "\\boxed{9^{9^{9^{9}}}}",
    "deeply nested latex": NESTED,
    "invalid utf-8": b"\xff\xfe\xfa answer \xc3\x28 \xed\xa0\x80".decode("utf-8", "surrogateescape"),
    "empty": "",
}


TIMEOUT = 2.0
KILL_MARGIN = 1.5  # killing the overrunning worker


@pytest.fixture(scope="module")
def math_plugin():
    plugin = VerifyMath(VerifyMath.Options(alpha=10.0, timeout_seconds=TIMEOUT, workers=2))
    plugin.pool.start()  # both workers ready
    assert plugin.posttrain_reward(["\\boxed{1}"], {"ground_truth": ["1"]}) == [10.0]
    yield plugin
    plugin.close()


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
    assert time.monotonic() - started < TIMEOUT + KILL_MARGIN  # the time limit, plus killing the worker
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
    assert time.monotonic() - started < TIMEOUT + KILL_MARGIN


def test_gsm8k_hostile_bytes_and_non_strings():
    plugin = VerifyGSM8K(VerifyGSM8K.Options(alpha=1.0))
    odd = [None, 12345, [{"role": "assistant", "content": "it is 7"}], {"content": "7"}]
    assert plugin.posttrain_reward(odd, {"ground_truth": ["7"] * 4}) == [0.0, 0.0, 1.0, 1.0]


def test_missing_package_is_reported_with_the_install_command(monkeypatch):
    from posttrain.registry import check_plugin_class

    monkeypatch.setattr(VerifyMath, "requires", {"no_such_module_xyz": "no-such-package"})
    with pytest.raises(ValueError, match="needs no-such-package: pip install 'no-such-package'"):
        check_plugin_class(VerifyMath)


# --------------------------------------------------------------------------------------
# verify_math: gold answers, the final answer kept whole, the pool of workers, a quiet worker
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gold,answer,expected", [
    ("\\sqrt{8}", "\\boxed{2\\sqrt{2}}", 10.0),  # math-verify's own reading finds nothing in the gold
    ("(x+1)^2", "\\boxed{x^2+2x+1}", 10.0),
    ("(x+1)^2", "\\boxed{x^2+1}", 0.0),
    ("2\\sqrt{2}", "\\boxed{2}", 0.0),  # its own reading takes the gold for 2
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", 10.0),
    ("(-\\infty, 3)", "\\boxed{3}", 0.0),  # ... and this one for 3
    ("(-\\infty, 3)", "so $x \\in (-\\infty, 3)$", 10.0),
    ("\\frac12", "\\boxed{0.5}", 10.0),
    ("1,234", "\\boxed{1234}", 10.0),
    ("#### 42", "\\boxed{42}", 10.0),  # delimited golds are read as before
    ("We get $\\frac{3}{4}$.", "\\boxed{0.75}", 10.0),
])
def test_bare_latex_golds(math_plugin, gold, answer, expected):
    assert math_plugin.posttrain_reward([answer], {"ground_truth": [gold]}) == [expected]


def test_gold_readings():
    assert gold_readings("\\sqrt{8}") == ["$\\sqrt{8}$", "\\boxed{\\sqrt{8}}", "\\sqrt{8}"]
    assert gold_readings("$\\frac{1}{2}$") == ["$\\frac{1}{2}$"]
    assert gold_readings("  ") == []


@pytest.mark.parametrize("gold,answer,expected", [
    ("x", "\\boxed{x}", 10.0),  # one letter: a variable, or a multiple-choice answer
    ("A", "\\boxed{A}", 10.0),
    ("(A)", "\\boxed{B}", 0.0),
    ("\\pi", "\\boxed{\\pi}", 10.0),  # a constant in LaTeX
    ("inf", "\\boxed{\\infty}", 10.0),  # a word math-verify reads as a constant
    ("$xy$", "\\boxed{yx}", 10.0),  # a product of letters, marked up as math
])
def test_letters_read_as_math_keep_working(math_plugin, gold, answer, expected):
    assert math_plugin.posttrain_reward([answer], {"ground_truth": [gold]}) == [expected]


def test_golds_in_words_abstain_and_are_counted(caplog):
    """math-verify reads "forty two" as f*o*o*r*t*t*w*y: "42" would score 0, an anagram 10. Not judged."""
    assert in_words("forty two") and in_words("yes") and in_words("Monday")
    assert not any(in_words(gold) for gold in ("x", "A", "(A)", "\\pi", "$xy$", "42", "x+y", "2 apples"))
    plugin = VerifyMath(VerifyMath.Options(timeout_seconds=TIMEOUT, workers=1))
    try:
        with caplog.at_level("WARNING", logger="posttrain.plugins.verify_math"):
            rewards = plugin.posttrain_reward(["forty two", "42", "\\boxed{forty two}", "\\boxed{two forty}"],
                                              {"ground_truth": ["forty two"] * 4})
        assert rewards == [None] * 4
        assert plugin.unreadable_golds == 1  # one distinct gold value
        assert "forty two" in caplog.text
    finally:
        plugin.close()


def test_unreadable_golds_are_counted_and_logged(caplog):
    plugin = VerifyMath(VerifyMath.Options(timeout_seconds=TIMEOUT, workers=1))
    try:
        with caplog.at_level("WARNING", logger="posttrain.plugins.verify_math"):
            rewards = plugin.posttrain_reward(["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{3}"],
                                              {"ground_truth": ["", "$$", "3", ""]})
        assert rewards == [None, None, 10.0, None]
        assert plugin.unreadable_golds == 2  # distinct gold values
        messages = [r.getMessage() for r in caplog.records if r.name == "posttrain.plugins.verify_math"]
        assert len(messages) == 2 and "2 distinct gold value(s)" in messages[1] and "ground_truth" in messages[1]
    finally:
        plugin.close()


BOXED = "\\boxed{\\frac{1}{3}}"


def straddling(answer: str, cut_inside: int, max_chars: int = 4000) -> str:
    """A long completion whose last max_chars characters begin cut_inside characters before the end of answer."""
    trail = ("\nChecking the result once more." * 200)[: max_chars - cut_inside]
    return "Let me think about it step by step. " * 200 + answer + trail


def test_final_answer_kept_whole_across_the_cut(math_plugin):
    text = straddling(BOXED, 3)
    assert text[-4000:].startswith("3}}")  # cut inside the box: the old tail read "3}}" as 3
    assert final_answer_text(text, 4000).startswith(BOXED) and len(final_answer_text(text, 4000)) <= 4000
    assert math_plugin.posttrain_reward([text, text, text], {"ground_truth": ["\\frac{1}{3}", "3", "1"]}) == \
        [10.0, 0.0, 0.0]
    # from the box to the end when that fits
    short = "x" * 5000 + BOXED + " done."
    assert final_answer_text(short, 4000) == BOXED + " done."
    # no box: whole lines, and no unmatched $ at the start
    lines = "words " * 2000 + "\nthe value is $5$ and\n" + "so the final answer is $\\frac{1}{2}$"
    assert final_answer_text(lines, 50) == "so the final answer is $\\frac{1}{2}$"
    assert final_answer_text("a $x+" + "y" * 100 + "$=7", 40) == "=7"  # a lone $ dropped
    assert math_plugin.posttrain_reward([lines], {"ground_truth": ["1/2"]}) == [10.0]


def test_final_answer_that_cannot_be_kept_whole_scores_zero(math_plugin):
    plugin = VerifyMath(dataclasses.replace(math_plugin.options, max_chars=100))
    plugin.pool = math_plugin.pool
    long_box = "\\boxed{" + " + ".join(["1"] * 60) + "}"  # 60, 187 characters
    unclosed = "Reasoning. " * 20 + "\\boxed{\\frac{1}{3} and so on" + " and on" * 20  # never closed
    assert final_answer_text(long_box, 100) is None and final_answer_text(unclosed, 100) is None
    started = time.monotonic()
    assert plugin.posttrain_reward([long_box, unclosed], {"ground_truth": ["60", "1/3"]}) == [0.0, 0.0]
    assert time.monotonic() - started < 0.5  # refused without a check
    assert plugin.posttrain_reward(["Reasoning. " * 20 + BOXED], {"ground_truth": ["1/3"]}) == [10.0]


SPLIT = "So the solutions are \\[ \\boxed{-2} \\quad \\text{and} \\quad \\boxed{1}. \\]"
REASONING = ("We factor the quadratic and check each root in turn. " * 100)[:4050]


def test_final_answer_over_several_boxes_kept_whole(math_plugin):
    """An answer written as several boxes is read whole from a long completion, as from a short one."""
    long = REASONING + SPLIT
    assert len(long) > 4000 and final_answer_text(long, 4000).startswith("\\boxed{-2}")
    checked_after = long + "\nChecking: both roots satisfy the equation." * 100  # the boxes alone fit
    assert final_answer_text(checked_after, 4000).startswith("\\boxed{-2}")
    assert final_answer_text(checked_after, 4000).endswith("\\boxed{1}")
    completions = [SPLIT, long, checked_after]
    assert math_plugin.posttrain_reward(completions, {"ground_truth": ["1,-2"] * 3}) == [10.0] * 3
    assert math_plugin.posttrain_reward(completions, {"ground_truth": ["1"] * 3}) == [0.0] * 3
    # a box of the reasoning, far up or only a paragraph before, is not part of the final answer
    far_up = "A first guess gives \\boxed{7}.\n" + REASONING + SPLIT
    near = REASONING + "A side result is \\boxed{7}.\n" + REASONING[:300] + "\n" + SPLIT
    for text in (far_up, near):
        assert "\\boxed{7}" not in final_answer_text(text, 4000), text[-400:]
    assert math_plugin.posttrain_reward([far_up, near], {"ground_truth": ["1,-2", "1,-2"]}) == [10.0, 10.0]
    assert math_plugin.posttrain_reward([far_up, near], {"ground_truth": ["7,-2,1", "7,-2,1"]}) == [0.0, 0.0]
    # hostile: a megabyte of boxes close together is cut to max_chars at once
    started = time.monotonic()
    window = final_answer_text("\\boxed{1}, " * 100_000, 4000)
    assert time.monotonic() - started < 0.1 and len(window) <= 4000


def hostile_batch(hostile_at):
    """Eight answers, every third one wrong, with a completion that keeps sympy busy forever at each index given."""
    completions = [f"\\boxed{{{i}}}" for i in range(8)]
    golds = [str(i if i % 3 else i + 1) for i in range(8)]
    expected = [0.0 if i % 3 == 0 else 10.0 for i in range(8)]
    for i in hostile_at:
        completions[i], expected[i] = HOSTILE["latex power tower"], 0.0
    return completions, {"ground_truth": golds}, expected


def timed_batch(plugin, hostile_at):
    completions, columns, expected = hostile_batch(hostile_at)
    plugin.pool.start()  # every worker ready
    started = time.monotonic()
    assert plugin.posttrain_reward(completions, columns) == expected  # in order
    return time.monotonic() - started


@pytest.mark.slow
def test_a_batch_with_hostile_completions_takes_one_timeout(math_plugin):
    """A batch is checked across the pool: a hostile completion holds one worker for the time limit
    while the others check the rest, so the batch costs one time limit, not one per hostile completion."""
    one = timed_batch(math_plugin, [2])  # two workers
    assert TIMEOUT <= one < TIMEOUT + KILL_MARGIN, one
    three = VerifyMath(dataclasses.replace(math_plugin.options, workers=3))
    single = VerifyMath(dataclasses.replace(math_plugin.options, workers=1))
    try:
        two = timed_batch(three, [2, 5])
        assert TIMEOUT <= two < TIMEOUT + KILL_MARGIN, two
        in_turn = timed_batch(single, [2, 5])  # one worker: one time limit after the other
        assert in_turn >= 2 * TIMEOUT, in_turn
    finally:
        three.close()
        single.close()
    print(f"\nbatch of 8, time limit {TIMEOUT:g} s: 1 hostile on 2 workers {one:.2f} s, 2 hostile on 3 workers "
          f"{two:.2f} s, 2 hostile on 1 worker {in_turn:.2f} s", file=sys.stderr)


def test_the_worker_does_not_print_math_verifys_timeout_warning():
    script = (
        "from posttrain.plugins.verify_math import VerifyMath\n"
        "p = VerifyMath(VerifyMath.Options(workers=1))\n"
        "print(p.posttrain_reward(['\\\\boxed{\\\\sqrt{8}}', 'it is 3'], {'ground_truth': ['2\\\\sqrt{2}', '4']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "default"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[10.0, 0.0]"
    assert "Timeout is disabled" not in out.stderr, out.stderr


# --------------------------------------------------------------------------------------
# One family
# --------------------------------------------------------------------------------------

VERIFIERS = [VerifyGSM8K, VerifyMath, VerifyCode, VerifyIFEval]


@pytest.mark.parametrize("cls", VERIFIERS, ids=lambda c: c.name)
def test_every_verifier_shares_the_base_and_its_options(cls):
    assert issubclass(cls, Verifier)
    defaults = {o["name"]: o["default"] for o in cls.options_schema()}
    assert {k: defaults[k] for k in ("alpha", "weight", "column", "only_if")} == \
        {"alpha": 10.0, "weight": 1.0, "column": "ground_truth", "only_if": {}}
    if cls in (VerifyMath, VerifyIFEval):
        assert defaults["workers"] == 2


def test_gsm8k_only_if_and_column():
    plugin = VerifyGSM8K(VerifyGSM8K.Options(alpha=2.0, column="answer", only_if={"dataset": ["gsm8k"]}))
    columns = {"answer": ["7", "7", None], "dataset": ["gsm8k", "MATH", "gsm8k"]}
    assert plugin.posttrain_reward(["it is 7", "it is 7", "it is 7"], columns) == [2.0, None, None]
    assert plugin.posttrain_reward(["it is 7"], {"ground_truth": ["7"]}) is None
