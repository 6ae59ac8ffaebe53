"""MATH-style verifier: the final answer is mathematically equal to the gold answer.

A reward source: α when ``math-verify`` finds the completion's final answer (``\\boxed{...}``,
"the answer is ...", a last expression) equal to the gold answer (as numbers, fractions,
expressions, intervals, sets...), else 0; it abstains for examples without a gold answer.

Hostile output cannot stall or crash training: each check runs in a separate worker process
(``posttrain.worker.CheckWorker``) with a time limit and a memory limit. A check that runs out
of time (``\\boxed{9^{9^{9^{9}}}}`` would keep sympy busy forever) or memory scores 0, and the
worker is killed and replaced.
Only the last ``max_chars`` characters of a completion are read: the final answer is there.
This works from any thread (math-verify's own timeouts use signals, which only work on the
main thread, so they are turned off inside the worker, where the process deadline applies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.types import completion_text
from posttrain.verifier import Verifier
from posttrain.worker import CheckWorker


def _setup():  # runs in the checking process
    from math_verify import parse, verify

    def check(request):
        gold, answer = request
        gold_parsed = parse(gold, parsing_timeout=None)
        if not gold_parsed:
            return None
        answer_parsed = parse(answer, parsing_timeout=None)
        return bool(answer_parsed) and bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))

    return check


class VerifyMath(Verifier):
    name = "verify_math"
    description = "reward α when the final answer equals the gold one mathematically (math-verify, sandboxed time)"
    requires = {"math_verify": "math-verify"}

    @dataclass
    class Options(Verifier.Options):
        timeout_seconds: float = field(default=5.0, metadata={"help": "Time limit of one check."})
        memory_mb: int = field(default=2048, metadata={"help": "Memory limit of the checking process."})
        max_chars: int = field(default=4000, metadata={"help": "Characters read from the end of a completion."})

        def validate(self):
            if self.timeout_seconds <= 0 or self.memory_mb < 256 or self.max_chars < 1:
                raise ValueError("timeout_seconds must be > 0, memory_mb >= 256, max_chars >= 1")

    def __init__(self, options=None):
        super().__init__(options)
        # a check that fails, overruns or runs out of memory scores 0 (False)
        self.worker = CheckWorker(_setup, memory_mb=self.options.memory_mb, failed=False, name="verify_math")

    def score(self, completion, gold):
        answer = completion_text(completion)[-self.options.max_chars:]
        return self.worker.call((str(gold), answer), self.options.timeout_seconds)
