"""Reward functions the tests name by import path (``reward_functions:format_reward``), written as people
write them for TRL's GRPOTrainer: open-r1's style (``completion[0]["content"]`` of conversational
completions, ``**kwargs`` for the rest, None where the gold answer cannot be read) and TRL's
documentation's ``reward_len`` on plain-text completions; functions with an author's mistakes; and
plugins that record the token ids and truncation flags the reward hook receives, with a sampler that
mixes short and over-long completions."""

import re
from dataclasses import dataclass

from posttrain import Plugin, hookimpl

THINK_ANSWER = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$", re.DOTALL)


def format_reward(completions, **kwargs):
    """1.0 where the reply is <think>...</think> followed by <answer>...</answer>, else 0.0."""
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if THINK_ANSWER.match(content) else 0.0 for content in contents]


def tag_count_reward(completions, **kwargs):
    """A quarter for each of the four tags that appears exactly once."""

    def count(text):
        return sum(0.25 for tag in ("<think>", "</think>", "<answer>", "</answer>") if text.count(tag) == 1)

    return [count(completion[0]["content"]) for completion in completions]


def _number(text):
    found = re.findall(r"-?\d+(?:\.\d+)?", str(text))
    return float(found[-1]) if found else None


def accuracy_reward(completions, solution, **kwargs):
    """1.0 where the last number of the reply equals the gold solution, 0.0 where not, None where the gold
    solution has no number (the example is skipped)."""
    rewards = []
    for completion, gold in zip(completions, solution):
        expected = _number(gold)
        if expected is None:
            rewards.append(None)
            continue
        got = _number(completion[0]["content"])
        rewards.append(1.0 if got == expected else 0.0)
    return rewards


accuracy_reward_again = accuracy_reward  # a second recipe key for the same name: refused


def reward_len(completions, **kwargs):
    """TRL's documentation's example: prefer completions of about 20 characters."""
    return [-abs(20 - len(completion)) for completion in completions]


async def async_reward(completions, **kwargs):
    """TRL also takes coroutine functions."""
    return [float(len(str(c))) for c in completions]


SEEN: list = []  # what record_reward was called with, one entry per call


def record_reward(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, **columns):
    """Records its arguments (TRL's keywords, named), logs a metric through TRL's callback, scores 0."""
    SEEN.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                 "trainer_state": trainer_state, "step": getattr(trainer_state, "global_step", None),
                 "columns": columns})
    log_metric("record_reward/calls", 1.0)
    log_extra("record_reward_seen", [1] * len(completions))
    return [0.0] * len(completions)


def broken_reward(completions, **kwargs):
    raise KeyError("answer")


def short_reward(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def text_reward(completions, **kwargs):
    return ["good" for _ in completions]


NOT_A_FUNCTION = 42


class NotAPlugin:
    """A class that is no posttrain.Plugin."""


class RecordTokens(Plugin):
    name = "record_tokens"
    description = "records the completions, token ids and truncation flags the reward hook gets; scores 0"
    seen: list = []

    @hookimpl
    def posttrain_reward(self, prompts, completions, completion_ids, truncated):
        RecordTokens.seen.append({"prompts": list(prompts), "completions": list(completions),
                                  "completion_ids": completion_ids, "truncated": truncated})
        return [0.0] * len(completions)


SHORT = "The answer is 42"
LONG = "The answer is 42 " * 10  # far over any length limit the tests set


class MixedSampler(Plugin):
    name = "mixed_sampler"
    description = "completion j of a batch is SHORT for even j, LONG (over the length limit) for odd j"

    @dataclass
    class Options:
        pass

    @hookimpl
    def posttrain_sample(self, prompts, num_samples):
        texts = iter(SHORT if j % 2 == 0 else LONG for j in range(len(prompts) * num_samples))
        return [[next(texts) for _ in range(num_samples)] for _ in prompts]
