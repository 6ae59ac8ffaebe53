"""How one source's records become the stage's (:class:`Reader`, the same at validation and at loading):

1. ``data.columns`` renames the ones a data format reads (its ``layout``);
2. the data format, if any, turns the record into the stage's columns;
3. ``data.columns`` renames the rest to the stage's names;
4. chat data written as text (a CSV cell holding ``[{"role": ...}]``) is read back as messages; pairs
   without a ``prompt`` get the part their two responses share as the prompt (TRL's implicit prompt),
   and responses that repeat the prompt (a ``prompt`` column and a ``chosen`` conversation that starts
   with the same user turn, or a text response that starts with the prompt's text) have it removed; text
   prompts become a user turn and a system prompt is put first as the recipe's :class:`PromptForm` says. Each
   repair is counted and reported.

Also here: the stage's text columns (``TEXT_COLUMNS``) and responses (``RESPONSES``), and :func:`as_bool`, a
label read as a bool."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from typing import Any

from ..errors import PluginHookError, UserError, contract_error, did_you_mean
from ..stage import Stage
from .keys import _key_field

TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "messages", "text")
RESPONSES = ("chosen", "rejected", "completion")
_TRUE, _FALSE = {"true", "1", "yes", "safe"}, {"false", "0", "no", "unsafe"}


def as_bool(value: Any) -> bool | None:
    """A label as a bool: a bool, 0/1, or 'true'/'false' (a CSV file's text); None if it is none of them."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return None


def _kind(value) -> str:
    """'text', 'messages' (a list of message mappings), or the value's type name."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return "messages"
    return type(value).__name__


def _chat_from_text(value: str):
    """A conversation written as text (a CSV cell: JSON or Python's repr of a list of messages), or None."""
    text = value.strip()
    if not (text.startswith("[") and text.endswith("]") and "role" in text):
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            parsed = parse(text)
        except (ValueError, SyntaxError):
            continue
        if isinstance(parsed, list) and parsed and all(isinstance(m, dict) and "role" in m for m in parsed):
            return parsed
    return None


def _shared_prefix(chosen, rejected):
    """TRL's implicit prompt: the messages two conversations share (up to the last user turn they share), or
    the text two responses share, cut at the last word boundary of both (the space goes with the responses, as
    TRL's ``extract_prompt`` does), so that the prompt never ends inside a word of either response; None when they
    share nothing."""
    if _kind(chosen) == "messages" and _kind(rejected) == "messages":
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and chosen[n - 1].get("role") != "user":
            n -= 1
        return chosen[:n] if n else None
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == min(len(chosen), len(rejected)):
            return None  # one response is the start of the other: no prompt to take
        def boundary(at: int) -> bool:  # a word ends here in both responses (so a token boundary in both)
            return chosen[at - 1].isspace() or all(at == len(t) or t[at].isspace() for t in (chosen, rejected))

        while n > 0 and not boundary(n):
            n -= 1  # back to a word boundary
        while n > 0 and chosen[n - 1].isspace():
            n -= 1  # the space starts the responses
        return chosen[:n] if n else None
    return None


def _without_prompt(prompt, response):
    """The response with a repeated prompt removed (None when it does not repeat it)."""
    if _kind(prompt) == "messages" and _kind(response) == "messages":
        n = len(prompt)
        if len(response) > n and [(m.get("role"), m.get("content")) for m in response[:n]] == \
                [(m.get("role"), m.get("content")) for m in prompt]:
            return response[n:]
        return None
    if isinstance(prompt, str) and isinstance(response, str) and prompt.strip() and response.startswith(prompt) \
            and len(response.strip()) > len(prompt.strip()):
        return response[len(prompt):]
    return None


def _renamed_names(names: list[str], mapping: dict[str, str]) -> list[str]:
    """Column names once ``mapping`` ({ours: theirs}) is applied: theirs become ours, a column already named
    like one of ours is replaced."""
    present = [ours for ours, theirs in mapping.items() if theirs in names]
    return [c for c in names if c not in mapping and c not in mapping.values()] + present


def _renamed_record(record: dict, mapping: dict[str, str]) -> dict:
    new = {ours: record[theirs] for ours, theirs in mapping.items() if theirs in record}
    out = {k: v for k, v in record.items() if k not in new and k not in mapping.values()}
    out.update(new)
    return out


@dataclass(frozen=True)
class PromptForm:
    """How a run's prompts reach the model: ``chat``, a text prompt becomes a user turn (rendered with the chat
    template); ``system``, a system message put before every conversation that has none. ``builtin_chat`` is for
    built-in data, whose own ``conversational`` option decides under ``prompt_format: auto``."""

    chat: bool = False
    system: str | None = None
    builtin_chat: bool = False

    def describe(self) -> str:
        form = "text prompts as a user turn of the chat template" if self.chat else "text prompts as they are"
        return form + (f", after the system prompt {self.system[:60]!r}" if self.system else "")


def prompt_form(recipe, has_template: bool | None) -> PromptForm:
    """The form a recipe's prompts take (``data.prompt_format``, ``data.system_prompt``). ``auto`` is chat in the
    stages that train on their own samples when the model has a chat template (``has_template``: None when that
    cannot be known here, taken as yes); a built-in dataset keeps the form its ``conversational`` option gives."""
    data = recipe.data
    if data.prompt_format == "auto":
        chat = bool(getattr(recipe.kind, "generates", False)) and has_template is not False
        return PromptForm(chat, data.system_prompt, builtin_chat=False)
    chat = data.prompt_format == "chat"
    return PromptForm(chat, data.system_prompt, builtin_chat=chat)


def _with_system(messages: list, system: str) -> list:
    return messages if messages and messages[0].get("role") == "system" else \
        [{"role": "system", "content": system}, *messages]


class Reader:
    """How one source's records become the stage's (see the module's docstring), with the repairs counted."""

    WORDS = {"chat_read_from_text": "conversations written as text read as messages",
             "prompt_from_shared_start": "rows without a prompt: the start their two responses share taken as the "
                                         "prompt",
             "prompt_removed_from_responses": "rows whose responses repeated the prompt: the prompt removed from "
                                              "them",
             "prompt_text_as_user_turn": "text prompts of conversational responses read as a user turn",
             "response_text_as_assistant_turn": "text responses to a conversation read as an assistant turn",
             "prompt_as_user_turn": "text prompts read as a user turn (data.prompt_format)",
             "system_prompt_added": "conversations given the system prompt (data.system_prompt)",
             "conversation_split": "conversations read as a prompt (every turn before the last) and a completion "
                                   "(the last reply)"}

    def __init__(self, stage: Stage, columns: dict[str, str], fmt=None, where: str = "data.source",
                 form: PromptForm | None = None, builtin: bool = False):
        self.stage, self.fmt, self.where = stage, fmt, where
        self.form = form or PromptForm()
        self.chat = self.form.builtin_chat if builtin else self.form.chat
        self.split_conversations = False  # a stage reading prompt/completion given `messages` (kto, LLaMA-Factory's)
        layout = set(getattr(type(fmt), "layout", ()) or ()) if fmt is not None else set()
        self.before = {ours: theirs for ours, theirs in columns.items() if ours in layout}
        self.after = {ours: theirs for ours, theirs in columns.items() if ours not in layout}
        self.counts = dict.fromkeys(self.WORDS, 0)

    def _check_mapping(self, mapping: dict[str, str], names: list[str]) -> None:
        for ours, theirs in mapping.items():
            if theirs not in names:
                raise UserError(f"column mapping {ours}: {theirs} names a column the data does not have"
                                f"{did_you_mean(theirs, names)}; it has: {', '.join(names)}",
                                field=_key_field(self.where, f"columns.{ours}"), fix="map to one of the data's columns")

    def _wants_prompt(self) -> bool:
        return any("prompt" in layout for layout in self.stage.layouts)

    def columns(self, names: list[str]) -> list[str]:
        """The columns the stage will see, from the source's."""
        self._check_mapping(self.before, names)
        names = _renamed_names(list(names), self.before)
        if self.fmt is not None:
            source = names
            try:
                names = list(self.fmt.posttrain_format_columns(columns=names))
            except UserError:
                raise
            except Exception as e:
                raise PluginHookError(self.fmt.name, "posttrain_format_columns", e) from e
            # a mapping the format already did (ShareGPT's `columns: {messages: conversations}`) is dropped
            consumed = set(source) - set(names)
            self.after = {ours: theirs for ours, theirs in self.after.items()
                          if not (theirs in consumed and ours in names)}
        self._check_mapping(self.after, names)
        names = _renamed_names(names, self.after)
        if "prompt" not in names and sum(r in names for r in RESPONSES) >= 2 and self._wants_prompt():
            names.append("prompt")  # the start the two responses share
        layouts = [set(layout) for layout in self.stage.layouts]
        if "messages" in names and not {"prompt", "completion"} & set(names) \
                and any({"prompt", "completion"} <= layout for layout in layouts) \
                and not any("messages" in layout for layout in layouts):
            self.split_conversations = True
            names = [n for n in names if n != "messages"] + ["prompt", "completion"]
        return names

    def record(self, raw: dict, row: int) -> dict:
        """One record of the source as the stage's: renamed, read by the data format, repaired (each repair
        counted)."""
        record = _renamed_record(raw, self.before)
        if self.fmt is not None:
            record = self._formatted(record, row)
        record = _renamed_record(record, self.after)
        if self.split_conversations and _kind(record.get("messages")) == "messages":
            self._split_conversation(record, row)
        self._read_chat_text(record)
        responses = [r for r in RESPONSES if record.get(r) is not None]
        if record.get("prompt") is None and len(responses) >= 2 and self._wants_prompt():
            self._take_shared_prompt(record, responses)
        self._prompt_turns(record, responses)
        if record.get("prompt"):
            self._remove_repeated_prompt(record, responses)
        if self.form.system:
            self._add_system_prompt(record, row)
        return record

    def _formatted(self, record: dict, row: int) -> dict:
        """The record as the data format reads it; its errors name this source, a bug in it names the plugin."""
        try:
            record = self.fmt.posttrain_format_record(record=record, row=row)
        except UserError as e:  # name the source the row is in
            if e.field and e.field.startswith("data (row"):
                e.field = self.where + e.field.removeprefix("data")
                e.args = (e.render(),)
            raise
        except Exception as e:  # a bug in the format plugin: name it
            raise PluginHookError(self.fmt.name, "posttrain_format_record", e) from e
        if not isinstance(record, dict):
            raise contract_error(self.fmt.name, "posttrain_format_record", record, "the record as a dict")
        return dict(record)

    def _split_conversation(self, record: dict, row: int) -> None:
        """``messages`` as a prompt (every turn before the last) and a completion (the assistant's last reply)."""
        messages = record.pop("messages")
        if not messages or messages[-1].get("role") != "assistant":
            raise UserError(f"row {row}: the conversation ends on a {messages[-1].get('role') if messages else 'no'} "
                            "turn; its last message is the completion, and must be the assistant's reply",
                            field=f"{self.where} (row {row}, messages)",
                            fix="end every conversation on the assistant's reply, or drop that row")
        record["prompt"], record["completion"] = messages[:-1], messages[-1:]
        self.counts["conversation_split"] += 1

    def _read_chat_text(self, record: dict) -> None:
        """Conversations written as text read back as messages."""
        for column in TEXT_COLUMNS:
            value = record.get(column)
            if isinstance(value, str):
                chat = _chat_from_text(value)
                if chat is not None:
                    record[column] = chat
                    self.counts["chat_read_from_text"] += 1

    def _take_shared_prompt(self, record: dict, responses: list[str]) -> None:
        """A pair without a prompt: the start its two responses share becomes the prompt (TRL's implicit prompt),
        or an empty prompt for two texts that share nothing."""
        first, second = record[responses[0]], record[responses[1]]
        prompt = _shared_prefix(first, second)
        if prompt is not None:
            record["prompt"] = prompt
            for r in responses:
                record[r] = record[r][len(prompt):]
            self.counts["prompt_from_shared_start"] += 1
        elif isinstance(first, str) and isinstance(second, str):
            record["prompt"] = ""  # nothing shared: pairs without a prompt (a reward model needs none)

    def _prompt_turns(self, record: dict, responses: list[str]) -> None:
        """A text prompt as a user turn (when the prompt form is chat, or the responses are conversations), and
        text responses to a conversation as an assistant turn."""
        prompt = record.get("prompt")
        if isinstance(prompt, str) and self.chat:
            record["prompt"] = prompt = [{"role": "user", "content": prompt}]
            self.counts["prompt_as_user_turn"] += 1
        if isinstance(prompt, str) and prompt and any(_kind(record.get(r)) == "messages" for r in responses):
            record["prompt"] = prompt = [{"role": "user", "content": prompt}]  # UltraFeedback's layout
            self.counts["prompt_text_as_user_turn"] += 1
        if _kind(prompt) == "messages" and prompt:
            for r in responses:
                if isinstance(record[r], str):
                    record[r] = [{"role": "assistant", "content": record[r]}]
                    self.counts["response_text_as_assistant_turn"] += 1

    def _remove_repeated_prompt(self, record: dict, responses: list[str]) -> None:
        """Responses that repeat the prompt have it removed (a row counted once)."""
        prompt = record["prompt"]
        repaired = False
        for r in responses:
            shorter = _without_prompt(prompt, record.get(r))
            if shorter is not None:
                record[r] = shorter
                repaired = True
        self.counts["prompt_removed_from_responses"] += repaired

    def _add_system_prompt(self, record: dict, row: int) -> None:
        """The system prompt put first in the row's conversation (its prompt, else its messages) when it has none."""
        column = "prompt" if _kind(record.get("prompt")) == "messages" else \
            "messages" if _kind(record.get("messages")) == "messages" else None
        if column is None:
            raise UserError(f"row {row}: data.system_prompt is a message of a conversation, and this row's prompt "
                            "is text, kept as text", field=f"{self.where} (row {row})",
                            fix="set data.prompt_format: chat (a text prompt becomes a user turn after the system "
                                "prompt), or remove data.system_prompt")
        if record[column] != _with_system(record[column], self.form.system):
            record[column] = _with_system(record[column], self.form.system)
            self.counts["system_prompt_added"] += 1

    def notes(self) -> list[str]:
        return [f"{n} {self.WORDS[k]}" for k, n in self.counts.items() if n]
