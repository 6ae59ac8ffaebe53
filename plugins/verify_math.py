"""MATH-style verifier: the final answer is mathematically equal to the gold answer.

A reward source: α when ``math-verify`` finds the completion's final answer (``\\boxed{...}``,
"the answer is ...", a last expression) equal to the gold answer (as numbers, fractions,
expressions, intervals, sets...), else 0; it abstains for examples without a gold answer.

Hostile output cannot stall or crash training: each check runs in a separate worker process
with a time limit and a memory limit. A check that runs out of time (``\\boxed{9^{9^{9^{9}}}}``
would keep sympy busy forever) or memory scores 0, and the worker is killed and replaced.
Only the last ``max_chars`` characters of a completion are read: the final answer is there.
This works from any thread (math-verify's own timeouts use signals, which only work on the
main thread, so they are turned off inside the worker, where the process deadline applies).
"""

from __future__ import annotations

import multiprocessing
import threading
from dataclasses import dataclass, field

from posttrain.types import completion_text
from posttrain.verifier import Verifier


def _serve(conn, memory_mb: int) -> None:  # runs in the worker process
    import resource

    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from math_verify import parse, verify

    while True:
        try:
            gold, answer = conn.recv()
        except EOFError:
            return
        try:
            gold_parsed = parse(gold, parsing_timeout=None)
            if not gold_parsed:
                conn.send(None)
                continue
            answer_parsed = parse(answer, parsing_timeout=None)
            conn.send(bool(answer_parsed) and bool(verify(gold_parsed, answer_parsed, timeout_seconds=None)))
        except MemoryError:
            conn.send(False)
        except Exception:  # noqa: BLE001 - any failure to read or compare the answer scores 0
            conn.send(False)


class _Worker:
    """One long-lived checking process; replaced when a check overruns."""

    def __init__(self, memory_mb: int):
        self.memory_mb = memory_mb
        self.process = None
        self.conn = None
        self.lock = threading.Lock()

    def _start(self):
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, self.memory_mb), daemon=True)
        self.process.start()
        child.close()
        self.conn = parent

    def _kill(self):
        if self.process is not None:
            self.process.kill()
            self.process.join(timeout=5)
        self.process = self.conn = None

    def check(self, gold: str, answer: str, timeout: float, startup: float = 60.0):
        """True/False, or None when the gold answer cannot be read (the source abstains)."""
        with self.lock:
            first = self.process is None or not self.process.is_alive()
            if first:
                self._start()
            try:
                self.conn.send((gold, answer))
                # the first call also waits for the worker to import math-verify
                if self.conn.poll(timeout + (startup if first else 0)):
                    return self.conn.recv()
            except (EOFError, BrokenPipeError, OSError):  # the worker died (e.g. out of memory)
                pass
            self._kill()
            return False


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
        self.worker = _Worker(self.options.memory_mb)

    def score(self, completion, gold):
        answer = completion_text(completion)[-self.options.max_chars:]
        return self.worker.check(str(gold), answer, self.options.timeout_seconds)
