"""Built-in datasets the project generates itself, so the demo and tests need no download.

Each generator has an options dataclass (checked like plugin options) and returns a list of
records. ``data.source: builtin:NAME`` selects one; ``data.options`` are its options.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class ArithmeticOptions:
    n: int = field(default=2000, metadata={"help": "Number of pairs."})
    seed: int = field(default=0, metadata={"help": "Generator seed (independent of the run seed)."})
    conversational: bool = field(default=True, metadata={
        "help": "Message lists (chat); false gives plain text ending in an answer stem, 'Answer: 23 + 58 =', "
                "with the number as the response."})
    operations: list[str] = field(default_factory=lambda: ["+", "-", "*"], metadata={"help": "Any of + - *."})
    max_operand: int = field(default=99, metadata={"help": "Largest operand of + and - (products use up to 12 x max)."})
    reference: bool = field(default=False, metadata={
        "help": "Add a 'reference' column, a gold response (the right answer), for triple-preference methods (TPO)."})

    def validate(self):
        if self.n < 1:
            raise ValueError("n must be at least 1")
        bad = set(self.operations) - {"+", "-", "*"}
        if bad or not self.operations:
            raise ValueError(f"operations must be a non-empty list of '+', '-', '*' (got {self.operations})")
        if self.max_operand < 2:
            raise ValueError("max_operand must be at least 2")


def _wrong_answer(rng: random.Random, right: int) -> int:
    """A plausible mistake: off by one or ten, or two digits swapped."""
    candidates = {right + 1, right - 1, right + 10, right - 10}
    digits = str(abs(right))
    if len(digits) >= 2 and digits[-1] != digits[-2]:
        swapped = int(digits[:-2] + digits[-1] + digits[-2])
        candidates.add(-swapped if right < 0 else swapped)
    candidates.discard(right)
    return rng.choice(sorted(candidates))


def arithmetic(options: ArithmeticOptions) -> list[dict]:
    """Arithmetic questions with a right answer (chosen) and a plausible wrong one (rejected).

    "Better" is verifiable: the `ground_truth` column holds the right number, so the held-out
    greedy answers can be checked by a reward plugin (e.g. verify_gsm8k).
    """
    rng = random.Random(options.seed)
    records = []
    seen = set()
    attempts = 0
    while len(records) < options.n and attempts < options.n * 50:
        attempts += 1
        op = rng.choice(options.operations)
        if op == "*":
            a, b = rng.randint(2, options.max_operand), rng.randint(2, 12)
        else:
            a, b = rng.randint(1, options.max_operand), rng.randint(1, options.max_operand)
        if (a, op, b) in seen and len(seen) < options.n:
            continue
        seen.add((a, op, b))
        right = a + b if op == "+" else a - b if op == "-" else a * b
        wrong = _wrong_answer(rng, right)
        question = f"What is {a} {op} {b}?"
        chosen = f"{a} {op} {b} = {right}"
        rejected = f"{a} {op} {b} = {wrong}"
        if options.conversational:
            record = {
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        else:
            # The answer stem makes the model's very next tokens the number, so greedy decoding tests the
            # same choice the pairs teach (a chat model's own phrasing would come first otherwise).
            record = {"prompt": f"Question: {question}\nAnswer: {a} {op} {b} =", "chosen": f" {right}",
                      "rejected": f" {wrong}"}
        if options.reference:
            record["reference"] = record["chosen"]
        record["ground_truth"] = str(right)
        records.append(record)
    return records


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
        ("preference",), "arithmetic questions, right answer preferred to a near miss"),
}
