"""Arithmetic data: question pairs with a right and a near-miss answer (preference), and short word
problems with their answer (online)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


def _check_arithmetic(options) -> None:
    """The checks the arithmetic generators share (n, operations, max_operand)."""
    if options.n < 1:
        raise ValueError("n must be at least 1")
    bad = set(options.operations) - {"+", "-", "*"}
    if bad or not options.operations:
        raise ValueError(f"operations must be a non-empty list of '+', '-', '*' (got {options.operations})")
    if options.max_operand < 2:
        raise ValueError("max_operand must be at least 2")


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
        _check_arithmetic(self)


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
class WordProblemOptions:
    n: int = field(default=2000, metadata={"help": "Number of problems."})
    seed: int = field(default=0, metadata={"help": "Generator seed (independent of the run seed)."})
    conversational: bool = field(default=True, metadata={
        "help": "Message lists (chat); false gives plain text ending in 'Answer:'."})
    operations: list[str] = field(default_factory=lambda: ["+", "-", "*"], metadata={
        "help": "Any of + - * (one step each)."})
    max_operand: int = field(default=20, metadata={"help": "Largest number in a problem (products: up to 10 x it)."})
    two_step: float = field(default=0.0, metadata={
        "help": "Fraction of problems with two steps (gain then loss), e.g. 0.3."})
    instruction: str = field(default="Give the final answer as a number.", metadata={
        "help": "Appended to every question ('' for none)."})

    def validate(self):
        _check_arithmetic(self)
        if not 0 <= self.two_step <= 1:
            raise ValueError("two_step must be in [0, 1]")


_NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar", "Priya",
          "Sam", "Tara", "Yuki"]
_THINGS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "cards", "coins"]
_CONTAINERS = ["boxes", "bags", "jars", "packs", "baskets"]


def _word_problem(rng: random.Random, op: str, top: int) -> tuple[str, int]:
    name, friend = rng.sample(_NAMES, 2)
    things = rng.choice(_THINGS)
    if op == "+":
        a, b = rng.randint(1, top), rng.randint(1, top)
        return rng.choice([
            f"{name} has {a} {things}. {friend} gives {name} {b} more. How many {things} does {name} have now?",
            f"There are {a} {things} on a table and {b} more in a drawer. How many {things} are there in all?",
        ]), a + b
    if op == "-":
        a = rng.randint(2, top)
        b = rng.randint(1, a - 1)
        return rng.choice([
            f"{name} had {a} {things} and gave {b} of them to {friend}. How many {things} does {name} have left?",
            f"A shelf holds {a} {things}. {name} takes {b} away. How many {things} are still on the shelf?",
        ]), a - b
    a, b = rng.randint(2, min(top, 10)), rng.randint(2, top)
    container = rng.choice(_CONTAINERS)
    return (f"{name} buys {a} {container} with {b} {things} in each. How many {things} does {name} buy in total?",
            a * b)


def word_problems(options: WordProblemOptions) -> list[dict]:
    """Short arithmetic word problems with their answer in a `ground_truth` column (for verify_gsm8k).

    Prompts only: for the online stage, where the policy writes the answers and a verifier scores them.
    """
    rng = random.Random(options.seed)
    records = []
    for _ in range(options.n):
        if rng.random() < options.two_step:
            name, friend = rng.sample(_NAMES, 2)
            things = rng.choice(_THINGS)
            a, b = rng.randint(1, options.max_operand), rng.randint(1, options.max_operand)
            c = rng.randint(1, a + b - 1) if a + b > 1 else 0
            question = (f"{name} has {a} {things}, buys {b} more and then gives {c} to {friend}. "
                        f"How many {things} does {name} have now?")
            answer = a + b - c
        else:
            question, answer = _word_problem(rng, rng.choice(options.operations), options.max_operand)
        if options.instruction:
            question = f"{question} {options.instruction}"
        prompt = [{"role": "user", "content": question}] if options.conversational else \
            f"Question: {question}\nAnswer:"
        records.append({"prompt": prompt, "ground_truth": str(answer)})
    return records
