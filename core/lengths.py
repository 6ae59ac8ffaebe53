"""What ``posttrain validate`` can tell about ``training.max_length`` before a model loads: the rows TRL will
drop at that length, counted from their tokens, and a recipe whose every row would be dropped refused.

What TRL drops, by stage (the rows as the data layer reads them, before any plugin's transform):

- sft: an example whose prompt alone fills max_length (``truncation_mode: keep_start``; with ``packing``,
  ``packing_strategy: bfd``): truncation leaves it no completion token. A ``messages`` conversation trained on
  every assistant turn needs its first reply to start within max_length. Nothing is dropped from ``text``
  data, with ``completion_only_loss: false``, with ``keep_end`` or with the packing strategies that split
  (``bfd_split``, ``wrapped``); conversations under ``assistant_only_loss`` are not judged here;
- preference: a pair whose prompt alone fills max_length (``keep_start``);
- kto: an example whose prompt alone fills max_length (pairs are two examples);
- reward_model: a pair whose prompt + chosen or prompt + rejected is longer than max_length.

The tokens are counted without torch or transformers: the ``tokenizers`` library reads the model folder's
``tokenizer.json`` (with ``tokenizer_config.json``'s ``add_bos_token``/``add_eos_token``), and a conversation is
rendered with the folder's chat template by jinja2 as transformers renders it (its sandbox, ``trim_blocks``,
``lstrip_blocks``, the special tokens as variables), then tokenised without special tokens. The check is
skipped, saying nothing, where no local ``tokenizer.json`` is found (a hub id, a pipeline stage's output, a
built-in model not converted yet), for hub datasets and a pipeline stage's dataset, and for conversations when
the chat template cannot be read or rendered here. Plain text is not tokenised when its length in bytes already
proves it fits (at most ``2 * bytes + 8`` tokens), so a long dataset of short rows is checked quickly.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from .errors import UserError
from .stage_refs import is_ref

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Unknown(Exception):
    """A row whose tokens cannot be counted here (no chat template, a template that fails to render)."""


def _content(value) -> str | None:
    if isinstance(value, dict):  # an AddedToken written out
        value = value.get("content")
    return value if isinstance(value, str) else None


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _compile(template: str):
    """A chat template compiled as transformers compiles it (``{% generation %}`` blocks render their body)."""
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class LocalTokenizer:
    """A model folder's tokenizer and chat template, as transformers would apply them, without torch."""

    def __init__(self, tokenizer, config: dict, template: str | None):
        self.tokenizer = tokenizer
        self.special = {name: _content(config.get(name)) for name in SPECIAL_TOKENS if _content(config.get(name))}
        self.eos_token = self.special.get("eos_token")
        # explicit add_bos_token/add_eos_token replace tokenizer.json's post-processor (as transformers does)
        self.explicit = "add_bos_token" in config or "add_eos_token" in config
        self.add = [config.get("add_bos_token") and self.special.get("bos_token"), None,
                    config.get("add_eos_token") and self.special.get("eos_token")]
        if config.get("split_special_tokens"):
            tokenizer.encode_special_tokens = True
        self.template_text = template
        self._template = None

    @classmethod
    def for_model(cls, model) -> LocalTokenizer | None:
        """The tokenizer a recipe's model section uses (``tokenizer``, else the model's; ``chat_template`` in
        place of its own when given), or None where there is no local ``tokenizer.json``."""
        tok = cls.load(model.tokenizer or model.name_or_path)
        if tok is not None and model.chat_template is not None:
            from .recipe import chat_template_text

            tok.template_text = chat_template_text(model.chat_template)
        return tok

    @classmethod
    def load(cls, name_or_path: str) -> LocalTokenizer | None:
        """The tokenizer of a local model folder with a ``tokenizer.json``; None where there is none."""
        from .models import model_folder

        folder = model_folder(name_or_path)
        if folder is None or not (folder / "tokenizer.json").is_file():
            return None
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            path = folder / "tokenizer_config.json"
            config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except Exception:  # noqa: BLE001 - a file these libraries cannot read: transformers may; say nothing
            return None
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(tokenizer, config, template if isinstance(template, str) else None)

    def encode(self, text: str, special: bool) -> list[int]:
        """Tokens of ``text``, with the special tokens the tokenizer adds to text when ``special``."""
        if not special or not self.explicit:
            return self.tokenizer.encode(text, add_special_tokens=special).ids
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos, _, eos = (self.tokenizer.token_to_id(t) if t else None for t in self.add)
        return ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])

    def encode_batch(self, texts: list[str], special: bool) -> list[list[int]]:
        """``encode`` of many texts at once (the tokenizers library's threads)."""
        if not texts:
            return []
        if special and self.explicit:
            return [self.encode(t, special) for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=special)]

    def text(self, text: str) -> list[int]:
        """Plain text's tokens, special tokens added (a tokenizer's ``__call__``)."""
        return self.encode(text, special=True)

    def render(self, messages: list, add_generation_prompt: bool = False, tools=None, **kwargs) -> str:
        """A conversation rendered with the chat template (``apply_chat_template(tokenize=False)``)."""
        if self.template_text is None:
            raise Unknown("no chat template")
        try:
            if self._template is None:
                self._template = _compile(self.template_text)
            chat = []
            for message in messages:
                reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning")
                                  if isinstance(message, dict) and message.get(k) is not None), None)
                chat.append(message if reasoning is None else {"thinking": reasoning, **message,
                                                               "reasoning_content": reasoning})
            return self._template.render(messages=chat, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **{**self.special, **kwargs})
        except Exception as e:  # noqa: BLE001 - a template that needs what only transformers gives it
            raise Unknown(f"the chat template does not render here: {e}") from None

    def chat(self, messages: list, add_generation_prompt: bool = False, tools=None, **kwargs) -> list[int]:
        """A conversation's tokens (``apply_chat_template(tokenize=True)``: rendered, no special tokens added)."""
        return self.encode(self.render(messages, add_generation_prompt, tools, **kwargs), special=False)


def _shared(a: list[int], b: list[int]) -> int:
    """The number of leading tokens ``a`` and ``b`` share (TRL's common_prefix_length), by bisection on slices."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _is_chat(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _with_eos(text: str, eos: str | None) -> str:
    return text if not eos or text.endswith(eos) else text + eos


@dataclass
class Probe:
    """One sequence to count. Without ``fulls``, the example's need (the smallest max_length that keeps it) is
    ``text``'s number of tokens. With ``fulls`` (a prompt, and the texts of prompt + each response), it is where
    the prompt's tokens stop matching those of every prompt + response, plus one (at most ``text``'s tokens + 1)."""

    text: str
    special: bool  # plain text: the tokenizer's special tokens are added (a rendered conversation: none)
    fulls: Callable[[], list[str]] | None = None

    @property
    def extra(self) -> int:
        return 0 if self.fulls is None else 1


class Rule(abc.ABC):
    """How one stage's rows are judged against max_length: ``probes(record)`` gives, for each example the row
    makes, the probes whose largest need is the example's."""

    def __init__(self, tok: LocalTokenizer, every_turn: bool = False):
        self.tok, self.every_turn = tok, every_turn

    def _template_kwargs(self, record: dict) -> dict:
        tools = record.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        extra = record.get("chat_template_kwargs")
        return {"tools": tools, **(extra if isinstance(extra, dict) else {})}

    def _prompt(self, record: dict, prompt, responses: list) -> list[Probe]:
        """A prompt-and-response example: TRL keeps it while the prompt's tokens (up to where they stop matching
        the prompt + response's) end before max_length."""
        tok = self.tok
        if _is_chat(prompt) or any(_is_chat(r) for r in responses):
            kwargs, prompt = self._template_kwargs(record), prompt or []
            text = tok.render(prompt, add_generation_prompt=True, **kwargs)
            return [Probe(text, False, lambda: [tok.render(prompt + list(r), **kwargs) for r in responses])]
        return [Probe(prompt, True, lambda: [prompt + _with_eos(r, tok.eos_token) for r in responses])]

    @abc.abstractmethod
    def probes(self, record: dict) -> list[list[Probe]]:
        """For each example the row makes, its probes."""


class SFTRule(Rule):
    def probes(self, record):
        if "messages" not in record:
            return [self._prompt(record, record.get("prompt", ""), [record["completion"]])]
        messages = record["messages"]
        if not self.every_turn:
            return [self._prompt(record, messages[:-1], [messages[-1:]])]
        # every assistant turn trains: the first one must start within max_length
        first = next(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        kwargs = self._template_kwargs(record)
        text = self.tok.render(messages[:first], add_generation_prompt=True, **kwargs)
        return [[Probe(text, False, lambda: [self.tok.render(messages, **kwargs)])]]


class PreferenceRule(Rule):
    def probes(self, record):
        return [self._prompt(record, record.get("prompt", ""), [record["chosen"], record["rejected"]])]


class KTORule(Rule):
    def probes(self, record):
        completions = [record["completion"]] if "completion" in record else [record["chosen"], record["rejected"]]
        return [self._prompt(record, record.get("prompt", ""), [c]) for c in completions]


class RewardRule(Rule):
    """TRL's RewardTrainer keeps a pair while prompt + chosen and prompt + rejected each fit max_length."""

    def probes(self, record):
        prompt, tok, probes = record.get("prompt") or "", self.tok, []
        for response in (record["chosen"], record["rejected"]):
            if _is_chat(response) or _is_chat(prompt):
                probes.append(Probe(tok.render(list(prompt or []) + list(response), **self._template_kwargs(record)),
                                    False))
            else:
                probes.append(Probe(prompt + _with_eos(response, tok.eos_token), True))
        return [probes]


def _needs(tok: LocalTokenizer, examples: list[list[Probe]], limit: int) -> list[int | None]:
    """Each example's need, or None where it certainly fits ``limit``. A probe is not tokenised when its length
    in bytes already proves it fits (a token covers at least half a byte, with a few special tokens besides);
    the others are tokenised in batches, and the texts of prompt + response only for the prompts that do not
    fit by themselves."""
    todo = [(i, probe) for i, probes in enumerate(examples) for probe in probes
            if 2 * len(probe.text.encode("utf-8")) + 8 + probe.extra > limit]
    needs: list[int | None] = [None] * len(examples)
    over = []  # (example, probe, its tokens) not known to fit
    for special in (True, False):
        batch = [(i, probe) for i, probe in todo if probe.special == special]
        for (i, probe), ids in zip(batch, tok.encode_batch([p.text for _, p in batch], special)):
            if len(ids) + probe.extra > limit:
                over.append((i, probe, ids))
    for special in (True, False):
        batch = [(i, ids, probe.fulls() if probe.fulls else None) for i, probe, ids in over if probe.special == special]
        texts = [text for _, _, fulls in batch for text in fulls or []]
        tokens = iter(tok.encode_batch(texts, special))
        for i, ids, fulls in batch:
            need = len(ids) if fulls is None else min(_shared(ids, next(tokens)) for _ in fulls) + 1
            needs[i] = need if needs[i] is None else max(needs[i], need)
    return needs


WHY = {
    "sft": "its prompt alone fills max_length, leaving no completion token to train on (TRL's SFTTrainer drops "
           "such examples)",
    "preference": "its prompt alone fills max_length, leaving no response token to train on (TRL's DPOTrainer "
                  "drops such pairs)",
    "kto": "its prompt alone fills max_length, leaving no completion token to train on (TRL's KTOTrainer drops "
           "such examples)",
    "reward_model": "prompt + chosen or prompt + rejected is longer than max_length (TRL's RewardTrainer drops such "
                    "pairs)",
}


def _setting(plan, key: str):
    from . import trl_fields

    if key in plan.trl_config:
        return plan.trl_config[key]
    return trl_fields.config_defaults(plan.stage.config).get(key)


def _sources(recipe):
    """Every source validation reads rows from (``posttrain.data.Source``): each training source (each entry of a
    list of sources, its rows of its split or slice, before its fraction or count), and the held-out one."""
    from .data import eval_source, training_sources

    yield from training_sources(recipe.data)
    held = eval_source(recipe.data)
    if held is not None:
        yield held


def _records(recipe, src) -> list[dict]:
    """A local or built-in source's rows as the stage reads them (columns mapped, format applied, repairs made);
    validation has already checked them."""
    from .data import Reader, source_records, detect_format, format_plugin, prompt_form
    from .models import has_chat_template

    names, raw = source_records(src.source, src.split, src.options, src.where)
    fmt = format_plugin(src.format, src.format_options)
    if fmt is None and raw:
        fmt = detect_format(names, raw[0])
    reader = Reader(recipe.kind, src.columns, fmt, src.where, prompt_form(recipe, has_chat_template(recipe.model)),
                    builtin=src.source.startswith("builtin:"))
    reader.columns(names)
    return [reader.record(r, i) for i, r in enumerate(raw, start=1)]


def _rule(plan, tok: LocalTokenizer, records: list[dict]) -> Rule | None:
    """The stage's rule for these rows, or None where TRL drops none of them at max_length."""
    stage = plan.stage.name
    if stage == "reward_model":
        return RewardRule(tok)
    if stage == "kto":
        return KTORule(tok)
    packing = bool(_setting(plan, "packing"))
    if stage == "preference":
        return PreferenceRule(tok) if _setting(plan, "truncation_mode") != "keep_end" else None
    if stage != "sft" or not records:
        return None
    if packing and _setting(plan, "packing_strategy") != "bfd":
        return None  # the overflow is split into other packed sequences: nothing is dropped
    if not packing and _setting(plan, "truncation_mode") == "keep_end":
        return None  # the completion's end is kept
    first = records[0]
    if "text" in first and "messages" not in first and "completion" not in first:
        return None  # every token trains
    if "messages" in first and "completion" not in first:
        if _setting(plan, "assistant_only_loss"):
            return None  # TRL's own assistant masks: not judged here
        every = getattr(plan.options, "assistant_turns", "every") == "every" and any(
            sum(m.get("role") == "assistant" for m in r["messages"]) > 1 for r in records)
        return SFTRule(tok, every_turn=every)
    if _setting(plan, "completion_only_loss") is False:
        return None  # the prompt's tokens train too
    return SFTRule(tok)


def check_lengths(plan) -> list[str]:
    """Notes on the rows TRL would drop at ``training.max_length``; a user error (exit 2) naming
    training.max_length when every row of a split would be dropped. Quiet where it cannot tell."""
    from .data import source_kind

    recipe = plan.recipe
    if plan.stage.name not in WHY:
        return []
    limit = _setting(plan, "max_length")
    if not isinstance(limit, int) or isinstance(limit, bool):
        return []
    tok = LocalTokenizer.for_model(recipe.model)
    if tok is None:
        return []
    notes = []
    for src in _sources(recipe):
        source = src.source
        if is_ref(source) or source_kind(source) == "dataset":
            continue
        records = _records(recipe, src)
        rule = _rule(plan, tok, records)
        if rule is None:
            continue
        try:
            needs = _needs(tok, [example for record in records for example in rule.probes(record)], limit)
        except (Unknown, KeyError, TypeError, AttributeError, StopIteration):
            continue  # rows this check cannot tokenise as TRL would: the run counts what TRL drops
        dropped = [n for n in needs if n is not None and n > limit]
        if not dropped:
            continue
        unit = "examples" if len(needs) != len(records) else "rows"
        if len(dropped) == len(needs):
            raise UserError(f"every one of the {len(needs)} {unit} of {source} would be dropped at "
                            f"training.max_length = {limit}: {WHY[plan.stage.name]}; the shortest needs "
                            f"{min(dropped)} tokens, the longest {max(dropped)}", field="training.max_length",
                            fix=f"raise training.max_length to at least {max(dropped)} (every {unit[:-1]} kept) or "
                                f"{min(dropped)} (the shortest kept), or shorten the data; `posttrain estimate` "
                                "shows what a longer one costs in memory")
        notes.append(f"{source}: {len(dropped)} of {len(needs)} {unit} would be dropped at training.max_length = "
                     f"{limit} ({WHY[plan.stage.name].split(' (')[0]}); keeping every one needs max_length "
                     f"{max(dropped)}")
    return notes
