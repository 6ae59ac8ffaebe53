"""Built-in datasets the project generates itself, so the demos and tests need no download.

Each generator has an options dataclass (checked like plugin options) and returns a list of
records. ``data.source: builtin:NAME`` selects one; ``data.options`` are its options. One module
per family: ``arithmetic`` (arithmetic pairs and word problems), ``instructions`` (IFEval-style
prompts), ``reasoning_gym`` (the optional reasoning-gym package), ``safety`` (a task whose safety and
helpfulness are both checked by rule: prompts, and pairs in PKU-SafeRLHF's layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .arithmetic import ArithmeticOptions, WordProblemOptions, arithmetic, word_problems
from .instructions import InstructionFollowingOptions, instruction_following
from .reasoning_gym import ReasoningGymOptions, reasoning_gym_tasks
from .reasoning_gym import columns as reasoning_gym_columns
from .safety import SaferLHFOptions, SafetyPromptOptions, saferlhf_pairs, safety_prompts


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
        ("preference", "online", "sft", "reward_model", "iterative", "rejection_sampling"),
        "arithmetic questions, right answer preferred to a near miss (sft: map completion to chosen)"),
    "word_problems": Generator(
        word_problems, WordProblemOptions, lambda o: ["prompt", "ground_truth"],
        ("online", "iterative", "rejection_sampling"),
        "arithmetic word problems (prompts + ground_truth) for RL with a verifier"),
    "instructions": Generator(
        instruction_following, InstructionFollowingOptions, lambda o: ["prompt", "instruction_id_list", "kwargs"],
        ("online", "iterative", "rejection_sampling"),
        "writing tasks with machine-checkable IFEval constraints (for verify_ifeval)"),
    "reasoning_gym": Generator(
        reasoning_gym_tasks, ReasoningGymOptions, reasoning_gym_columns,
        ("online", "iterative", "rejection_sampling"),
        "reasoning-gym tasks (gsm_symbolic, chain_sum, ...; optional package reasoning-gym)"),
    "safety_prompts": Generator(
        safety_prompts, SafetyPromptOptions,
        lambda o: ["prompt", "safety_kind", "secret", "forbidden_action", "ground_truth"],
        ("online", "iterative", "rejection_sampling"),
        "benign questions and requests for a secret or a forbidden action (for the safety and helpful reward sources)"),
    "saferlhf_pairs": Generator(
        saferlhf_pairs, SaferLHFOptions,
        lambda o: ["prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                   "better_response_id", "safer_response_id", "safety_kind", "secret", "forbidden_action",
                   "ground_truth"],
        ("preference", "reward_model", "sft"),
        "pairs of the safety task in PKU-SafeRLHF's layout with its label noise (read with data.format: saferlhf)"),
}
