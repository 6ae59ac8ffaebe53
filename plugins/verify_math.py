"""MATH-style verifier: the final answer is mathematically equal to the gold answer.

A reward source: α when ``math-verify`` finds the completion's final answer (``\\boxed{...}``,
"the answer is ...", a last expression) equal to the gold answer (as numbers, fractions,
expressions, intervals, sets...), else 0; it abstains for examples without a gold answer.

Gold answers are read robustly. A gold with its own delimiters (``$...$``, ``\\(...\\)``,
``\\[...\\]``, ``\\boxed{}``, ``#### 42``: a worked solution, or an answer already marked up) is read
the way math-verify reads it. A bare gold (``\\sqrt{8}``, ``(x+1)^2``, ``\\frac{1}{2}``, ``42``, as in
MATH's ``answer`` column or Tülu 3's ``ground_truth``) is read whole as LaTeX, as if written
``$...$`` (then ``\\boxed{...}``, then as plain text): math-verify's default reading finds nothing in
``\\sqrt{8}`` and only the ``2`` of ``2\\sqrt{2}``. A bare gold in words (``forty two``, ``yes``:
only letters, spaces and ``-',.``, two letters or more in a row) that math-verify reads as letters
multiplied together (``f*o*o*r*t*t*w*y``: ``42`` would score 0 and an anagram α) is not read; one
it reads otherwise (``inf``, as infinity) is, and so are single letters (``x``, ``(A)``) and a
product marked up as math (``$xy$``). A gold that cannot be read is a problem of the dataset, not
of the completion: the source abstains there, counts it (``unreadable_golds``: how many distinct
gold values could not be read, in words included) and logs a warning with the count (at the 1st,
2nd, 4th, 8th... one).

Only the final answer needs to be read, and a completion longer than ``max_chars`` characters
is cut to it: from the first box of its final answer to the end of the text, or, when that is too
long, those boxes alone, braces balanced. The final answer's boxes are its last ``\\boxed{`` /
``\\fbox{`` and each box before it that closes less than 70 characters before the next one begins
(math-verify reads such boxes, ``\\boxed{-2} \\quad \\text{and} \\quad \\boxed{1}``, as one answer, and
decides among them), as many as fit in ``max_chars``; a box further up in the reasoning is left
out. A last box that is not closed or is longer than ``max_chars`` cannot be read whole and scores
0 (reading a cut box would read another number). Without a box, the last ``max_chars`` characters
are read, from the start of a line (else of a word), with an unmatched ``$``, ``\\)`` or ``\\]`` at
their start dropped.

Hostile output cannot stall or crash training: each check runs in a worker process
(``posttrain.worker.CheckPool``) with a time limit and a memory limit. A check that runs out
of time (``\\boxed{9^{9^{9^{9}}}}`` would keep sympy busy forever) or memory scores 0, and its
process is killed and replaced. A batch is checked ``workers`` completions at a time, so a
completion that runs into the time limit does not hold up the rest of the batch. This works from
any thread (math-verify's own timeouts use signals, which only work on the main thread, so they
are turned off inside the workers, where the process deadline applies, and math-verify's
warning about that is silenced).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from posttrain.types import completion_text
from posttrain.verifier import Verifier
from posttrain.worker import CheckPool

log = logging.getLogger(__name__)

_DELIMITED = ("$", "\\(", "\\[", "\\boxed", "\\fbox", "####")
_BOXES = ("\\boxed", "\\fbox")
# math-verify reads boxes closer together than this (closer than 10 characters, or than 70 with "and", "or", ","
# or ";" between them) as one answer; a long completion keeps all such boxes, and math-verify picks among them
_ANSWER_GAP = 70
_LETTERS = re.compile(r"[^\W\d_]{2,}")  # two letters or more in a row: a word
_WORD_MARKS = frozenset(" \t\n-',.")
_GOLD_CACHE = 4096  # parsed gold answers kept per worker (the same gold comes with every completion of a prompt)


def gold_readings(gold: str) -> list[str]:
    """The texts math-verify is given for a gold answer, in order, until one of them parses."""
    text = gold.strip()
    if not text:
        return []
    if any(mark in text for mark in _DELIMITED):
        return [text]
    return [f"${text}$", f"\\boxed{{{text}}}", text]


def in_words(gold: str) -> bool:
    """Whether a gold answer is plain words (``forty two``, ``yes``): nothing but letters, spaces and ``-',.``,
    two letters or more in a row. Read as LaTeX, such a word is a product of one-letter variables."""
    text = gold.strip()
    return bool(_LETTERS.search(text)) and all(char.isalpha() or char in _WORD_MARKS for char in text)


def _closing_brace(text: str, open_at: int, limit: int) -> int | None:
    """The index just past the brace that closes ``text[open_at]``, looking at most ``limit`` characters."""
    depth = 0
    i, end = open_at, min(len(text), open_at + limit)
    while i < end:
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character, \{ and \} included
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _box_end(text: str, start: int, limit: int) -> int | None:
    """The index just past the box that starts at ``text[start]`` (``\\boxed{...}`` or ``\\fbox{...}``), looking at
    most ``limit`` characters; None when it is not closed within them or its command has no brace."""
    brace = start + len("\\boxed" if text.startswith("\\boxed", start) else "\\fbox")
    end = min(len(text), start + limit)
    while brace < end and text[brace] in " \t\n":
        brace += 1
    if brace >= end or text[brace] != "{":
        return None  # \boxed followed by something else: nothing to keep whole
    return _closing_brace(text, brace, end - brace)


def _last_box(text: str, start: int, stop: int) -> int:
    """Where the last box that lies in ``text[start:stop]`` begins, or -1."""
    return max(text.rfind(box, start, stop) for box in _BOXES)


def final_answer_text(text: str, max_chars: int) -> str | None:
    """The part of a completion that math-verify reads: at most ``max_chars`` characters holding the
    final answer whole, or None when the final answer cannot be kept whole."""
    if len(text) <= max_chars:
        return text
    last = _last_box(text, 0, len(text))
    if last >= 0:
        end = _box_end(text, last, max_chars)
        if end is None:
            return None
        # the final answer may take several boxes (\boxed{-2} \quad \text{and} \quad \boxed{1}): take in each box
        # that closes less than _ANSWER_GAP characters before the next one begins, as many as fit
        first = last
        while (previous := _last_box(text, max(0, end - max_chars), first)) >= 0:
            previous_end = _box_end(text, previous, first - previous)  # closed before the next box begins
            if previous_end is None or first - previous_end >= _ANSWER_GAP:
                break
            first = previous
        return text[first:] if len(text) - first <= max_chars else text[first:end]
    tail = text[-max_chars:]
    line = tail.find("\n")
    if 0 <= line < len(tail) - 1:
        tail = tail[line + 1:]
    else:
        space = next((i for i, c in enumerate(tail) if c.isspace()), -1)
        if space >= 0:
            tail = tail[space + 1:]
    for opening, closing in (("\\(", "\\)"), ("\\[", "\\]")):
        close_at = tail.find(closing)
        if close_at >= 0 and not 0 <= tail.find(opening) < close_at:
            tail = tail[close_at + len(closing):]
    if (tail.count("$") - tail.count("\\$")) % 2:
        tail = tail[tail.find("$") + 1:]
    return tail


class _QuietTimeoutWarning(logging.Filter):
    """Drops math-verify's warning that its own (signal-based) timeouts are off: the worker's deadline applies."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


def _setup():  # runs in the checking process
    from math_verify import parse, verify
    from sympy import Basic, Mul

    quiet = _QuietTimeoutWarning()
    for name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "math_verify"]:
        logging.getLogger(name).addFilter(quiet)

    golds: dict[str, list] = {}

    def read_gold(gold: str) -> list:
        if gold not in golds:
            if len(golds) >= _GOLD_CACHE:
                golds.clear()
            readings = (parse(text, parsing_timeout=None) for text in gold_readings(gold))
            parsed = next((parsed for parsed in readings if parsed), [])
            if in_words(gold) and any(isinstance(value, Basic) and value.atoms(Mul) for value in parsed):
                parsed = []  # its words read as letters multiplied together: not its meaning (inf, read as oo, is)
            golds[gold] = parsed
        return golds[gold]

    def check(request):
        gold, answer = request
        gold_parsed = read_gold(gold)
        if not gold_parsed:
            return None  # the gold answer cannot be read: the caller abstains and counts it
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
        memory_mb: int = field(default=2048, metadata={"help": "Memory limit of each checking process."})
        max_chars: int = field(default=4000, metadata={
            "help": "Most characters of a completion read: its final answer, kept whole (a longer answer scores 0)."})
        workers: int = field(default=2, metadata={
            "help": "Checking processes; a batch is checked this many completions at a time."})

        def validate(self):
            if self.timeout_seconds <= 0:
                raise ValueError("timeout_seconds must be > 0")
            if self.memory_mb < 256:
                raise ValueError("memory_mb must be at least 256")
            if self.max_chars < 1:
                raise ValueError("max_chars must be at least 1")
            if not 1 <= self.workers <= 64:
                raise ValueError("workers must be between 1 and 64")

    def __init__(self, options=None):
        super().__init__(options)
        # a check that fails, overruns or runs out of memory scores 0 (False)
        self.pool = CheckPool(_setup, size=self.options.workers, memory_mb=self.options.memory_mb, failed=False,
                              name="verify_math")
        self.unreadable_golds = 0
        self._unreadable: set[int] = set()

    def _request(self, completion, gold) -> tuple[str, str] | None:
        """What the worker checks, or None when the completion scores 0 unchecked."""
        try:
            answer = final_answer_text(completion_text(completion), self.options.max_chars)
        except Exception:  # noqa: BLE001 - an object that cannot even be read scores 0
            return None
        return None if answer is None else (str(gold), answer)

    def _verdict(self, gold, reply) -> bool | None:
        if reply is not None:
            return bool(reply)
        key = hash(str(gold))
        if key not in self._unreadable:
            self._unreadable.add(key)
            self.unreadable_golds += 1
            count = self.unreadable_golds
            if count & (count - 1) == 0:  # 1, 2, 4, 8...
                log.warning("verify_math abstains where the gold answer cannot be read: %d distinct gold value(s) "
                            "so far in column '%s', e.g. %r; check the dataset (a bare answer is read as LaTeX, "
                            "an answer in words is not read, prose needs $...$, \\boxed{} or ####)", count,
                            self.options.column, str(gold)[:200])
        return None

    def score(self, completion, gold):
        return self.score_batch([completion], [gold], [None])[0]

    def score_batch(self, completions, golds, prompts):
        requests = [self._request(completion, gold) for completion, gold in zip(completions, golds, strict=True)]
        todo = [i for i, request in enumerate(requests) if request is not None]
        replies = self.pool.map([requests[i] for i in todo], self.options.timeout_seconds)
        verdicts: list = [False] * len(requests)
        for i, reply in zip(todo, replies, strict=True):
            verdicts[i] = self._verdict(golds[i], reply)
        return verdicts

    def close(self) -> None:
        self.pool.close()
