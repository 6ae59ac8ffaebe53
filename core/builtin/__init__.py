"""Built-in datasets the project generates itself, so the demos and tests need no download.

Each generator has an options dataclass (checked like plugin options) and returns a list of
records. ``data.source: builtin:NAME`` selects one; ``data.options`` are its options. One module
per family: ``arithmetic`` (arithmetic pairs and word problems), ``instructions`` (IFEval-style
prompts), ``reasoning_gym`` (the optional reasoning-gym package).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .arithmetic import ArithmeticOptions, WordProblemOptions, arithmetic, word_problems
from .instructions import InstructionFollowingOptions, instruction_following
from .reasoning_gym import ReasoningGymOptions, reasoning_gym_tasks
from .reasoning_gym import columns as reasoning_gym_columns


@dataclass
class Generator:
    fn: Callable[..., list[dict]]
    options: type
    columns: Callable[..., list[str]]  # the columns made with the given options
    stages: tuple[str, ...]
    description: str


BUILTIN_DATASETS = {
    "arithmetic": Generator(
        arithmetic, ArithmeticOptions,
        lambda o: ["prompt", "chosen", "rejected", "ground_truth"] + (["reference"] if o.reference else []),
        ("preference", "online", "sft", "reward_model"),
        "arithmetic questions, right answer preferred to a near miss (sft: map completion to chosen)"),
    "word_problems": Generator(
        word_problems, WordProblemOptions, lambda o: ["prompt", "ground_truth"],
        ("online",), "arithmetic word problems (prompts + ground_truth) for RL with a verifier"),
    "instructions": Generator(
        instruction_following, InstructionFollowingOptions, lambda o: ["prompt", "instruction_id_list", "kwargs"],
        ("online",), "writing tasks with machine-checkable IFEval constraints (for verify_ifeval)"),
    "reasoning_gym": Generator(
        reasoning_gym_tasks, ReasoningGymOptions, reasoning_gym_columns,
        ("online",), "reasoning-gym tasks (gsm_symbolic, chain_sum, ...; optional package reasoning-gym)"),
}
