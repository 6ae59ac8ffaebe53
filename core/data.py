"""Where training data comes from, and how its records become the stage's: built-in generators, local files
(``.jsonl``, ``.json``, ``.csv``, ``.parquet``), folders written by ``datasets``' ``save_to_disk``, or a hub
dataset.

Reading a record (the same at validation and at loading, :class:`Reader`):

1. ``data.columns`` renames the ones a data format reads (its ``layout``);
2. a data format (a plugin, named by ``data.format`` or detected: ``sharegpt``, ``openai_preference``,
   ``hh``, ``saferlhf``...) turns the record into the stage's columns;
3. ``data.columns`` renames the rest to the stage's names;
4. chat data written as text (a CSV cell holding ``[{"role": ...}]``) is read back as messages; pairs
   without a ``prompt`` get the part their two responses share as the prompt (TRL's implicit prompt),
   and responses that repeat the prompt (a ``prompt`` column and a ``chosen`` conversation that starts
   with the same user turn, or a text response that starts with the prompt's text) have it removed. Each
   repair is counted and reported.

``check_source`` runs during validation, before any model or heavy library is loaded: a local source is
read in full, row by row, and the first bad row (missing or null fields, bytes that are not UTF-8, a line
that is not JSON, a column that mixes text and conversations, a conversation that does not end on the
assistant) is refused naming the row, the field and the fix. ``load_splits`` builds the ``datasets.Dataset``
objects for a run, reads them the same way and checks them again (a hub dataset is first seen there).

A split may be sliced (``train[:5%]``, ``train[10:20]``: :class:`SplitSlice`, read as ``datasets`` reads it), and
``data.source`` may be a list of sources, each with keys of its own (:class:`Source`): each is checked and read on
its own, its ``fraction`` or ``count`` of rows sampled with the recipe's seed (:func:`sample_rows`), then the rows
are concatenated in order (:func:`check_mix`, :func:`read_mix`).
"""

from __future__ import annotations

import ast
import csv
import io
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .builtin import BUILTIN_DATASETS
from .errors import UserError, did_you_mean
from .plugin import parse_options
from .stage import Stage
from .stage_refs import dataset_path, is_ref

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
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


# -- sources ----------------------------------------------------------------------------------------


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file())


def source_kind(source: str) -> str:
    """'builtin', 'file', 'saved' (a save_to_disk folder), or 'dataset' (a hub id or a local dataset folder,
    read by datasets.load_dataset)."""
    if source.startswith("builtin:"):
        return "builtin"
    p = Path(source).expanduser()
    if p.is_dir():
        return "saved" if is_saved_dataset(p) else "dataset"
    if p.suffix.lower() in FILE_FORMATS or source.startswith((".", "/", "~")) or p.exists():
        return "file"
    return "dataset"


def _utf8(raw: bytes, where: str, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at position {e.start})",
                        field=where, fix="re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`), "
                                         "or drop that row") from None


def _saved_files(path: Path, split: str | None, where: str = "data.source") -> list[Path]:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        name = split or "train"
        if name not in splits:
            raise UserError(f"the saved dataset '{path}' has no split '{name}'{did_you_mean(name, splits)}",
                            field=_split_field(where), fix=f"its splits: {', '.join(splits)}")
        path = path / name
    elif split not in (None, "train"):
        raise UserError(f"the saved dataset '{path}' is one Dataset, which has one split; there is no split '{split}'",
                        field=_split_field(where),
                        fix="hold out a fraction of it (data.eval.fraction), or save a DatasetDict with that split")
    files = sorted(path.glob("*.arrow"))
    if not files:
        raise UserError(f"'{path}' holds no .arrow file", field=where,
                        fix="point at a folder written by Dataset.save_to_disk")
    return files


def _starts_json_document(path: Path) -> bool:
    """A .json file holding one document (a list or a mapping) rather than JSON lines."""
    with path.open("rb") as f:
        start = f.read(65536).lstrip()
    if not start.startswith((b"[", b"{")):
        return False
    if start.startswith(b"["):
        return True
    try:  # a mapping of columns, or the first of several JSON lines?
        first_line = start.split(b"\n", 1)[0]
        json.loads(first_line)
        return b"\n" not in start.strip()
    except ValueError:
        return True


def _json_document(path: Path, where: str):
    text = _utf8(path.read_bytes(), where, str(path))
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}", field=where,
                        fix="fix the file (a list of records, a mapping of columns, or a mapping of splits to lists "
                            "of records), or use .jsonl") from None


def _is_split_mapping(data) -> bool:
    """A JSON document ``{"train": [{...}, ...], "test": [...]}``: splits, each a list of records."""
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, list) and v and all(isinstance(r, dict) for r in v) for v in data.values())


def _split_field(where: str) -> str:
    if _is_entry(where):
        return f"{where}.split"
    return {"data.source": "data.split", "data.eval.source": "data.eval.split"}.get(where, where)


def _is_entry(where: str) -> bool:
    """``where`` names an entry of a list of sources (``data.source[1]``), which has keys of its own."""
    return where.startswith("data.source[")


def _key_field(where: str, key: str) -> str:
    """The recipe key (columns, options, subset...) that reads the source ``where`` names: an entry's own, else
    the data section's."""
    return f"{where}.{key}" if _is_entry(where) else f"data.{key}"


# -- splits and their slices ------------------------------------------------------------------------------

_SLICE = re.compile(r"^(?P<name>\w+(?:\.\w+)*)\[(?:(?P<start>-?[\d_]+)(?P<start_pct>%)?)?:"
                    r"(?:(?P<stop>-?[\d_]+)(?P<stop_pct>%)?)?\]$")


@dataclass(frozen=True)
class SplitSlice:
    """A split and the part of it that is read: ``train[:5%]``, ``train[10:20]``, ``test[-100:]``, in the grammar
    of ``datasets.ReadInstruction`` (bounds in rows, or in percent of the split's rows when either has a %)."""

    name: str
    start: int | None = None
    stop: int | None = None
    percent: bool = False

    @property
    def whole(self) -> bool:
        return self.start is None and self.stop is None

    @property
    def needs_length(self) -> bool:
        """Whether the bounds depend on how many rows the split has (a percentage, a bound from the end)."""
        return self.percent or any(b is not None and b < 0 for b in (self.start, self.stop))

    def bounds(self, rows: int) -> tuple[int, int]:
        """The rows [start, stop) of a split of ``rows`` rows, as ``datasets`` computes them: a percentage rounded
        to the closest row (Python's round), a negative bound counted from the end, both kept within the split."""
        def at(bound: int | None, default: int) -> int:
            if bound is None:
                return default
            if self.percent:
                bound = int(round(bound * rows / 100.0))
            if bound < 0:
                bound = max(rows + bound, 0)
            return min(bound, rows)

        return at(self.start, 0), at(self.stop, rows)


def parse_split(split: str | None, where: str) -> SplitSlice | None:
    """A split as its name and slice (None for None); a split without ``[`` is a name, as it is."""
    if split is None:
        return None
    if "[" not in split and "+" not in split:
        return SplitSlice(split)
    match = _SLICE.match(split.strip())
    if match is None:
        raise UserError(f"cannot read the split '{split}' as a split and a slice of it", field=_split_field(where),
                        fix="write a split name and an optional slice, as datasets does: train, train[:5%], "
                            "train[10%:20%], train[10:20], test[:1000] (a union of splits, `+`, and a rounding, "
                            "`(pct1_dropremainder)`, are read for hub datasets only: give several sources instead)")
    number = lambda key: int(match[key]) if match[key] is not None else None  # noqa: E731
    return SplitSlice(match["name"], number("start"), number("stop"), bool(match["start_pct"] or match["stop_pct"]))


def _in_slice(records: Callable[[], Iterator[tuple[int, dict]]], part: SplitSlice | None
              ) -> Iterator[tuple[int, dict]]:
    """The (row, record) pairs of ``records()`` within the slice ``part`` (every one without a slice), row numbers
    kept (they count the source's rows); ``records()`` is read twice when the bounds need the split's length."""
    if part is None or part.whole:
        yield from records()
        return
    if part.needs_length:
        start, stop = part.bounds(sum(1 for _ in records()))
    else:
        start, stop = part.start or 0, part.stop
    for i, pair in enumerate(records()):
        if stop is not None and i >= stop:
            return
        if i >= start:
            yield pair


def file_splits(path: Path) -> list[str] | None:
    """The splits of a local file that holds several (a .json mapping of split names to records), else None."""
    if path.suffix.lower() != ".json" or not path.is_file() or not _starts_json_document(path):
        return None
    stat = path.stat()
    splits = _document_splits(path.resolve(), stat.st_mtime_ns, stat.st_size)
    return None if splits is None else list(splits)


@lru_cache(maxsize=16)
def _document_splits(path: Path, mtime_ns: int, size: int) -> tuple[str, ...] | None:
    """file_splits of one version of a file (its modification time and size: read once, not at every check)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return tuple(data) if _is_split_mapping(data) else None


def folder_splits(path: Path) -> list[str] | None:
    """The splits ``datasets.load_dataset`` finds in a local folder of data files (by their names: train,
    test, validation...), or None when it finds none."""
    from datasets.data_files import EmptyDatasetError, get_data_patterns  # light: no torch

    try:
        return [str(name) for name in get_data_patterns(str(path))]
    except EmptyDatasetError:
        return None


def read_records(path: Path, where: str, split: str | None = None) -> Iterator[tuple[int, dict]]:
    """Every record of a local file or saved dataset, in order, as (row number from 1, record); a line that is
    not JSON, bytes that are not UTF-8 and records that are not mappings are refused naming the row."""
    if path.is_dir():
        import pyarrow as pa

        row = 0
        for file in _saved_files(path, split, where):
            with pa.memory_map(str(file)) as source:
                try:
                    reader = pa.ipc.open_stream(source)
                except pa.ArrowInvalid:
                    reader = pa.ipc.open_file(source)
                batches = reader if hasattr(reader, "__iter__") else (reader.get_batch(i)
                                                                      for i in range(reader.num_record_batches))
                for batch in batches:
                    for record in batch.to_pylist():
                        row += 1
                        yield row, record
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not _starts_json_document(path)):
        row = 0
        with path.open("rb") as f:  # streamed: a large file is never held whole
            for i, raw in enumerate(f):
                if not raw.strip():
                    continue
                row += 1
                where_row = f"{where} (row {row}, line {i + 1})"
                text = _utf8(raw, where_row, f"line {i + 1} of {path}")
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    last = not f.read().strip()
                    cut = " (the file's last line: it looks cut off)" if last else ""
                    raise UserError(f"line {i + 1} of {path} is not valid JSON{cut}: {e.msg} at column {e.colno}",
                                    field=where_row, fix="fix or remove that line (one JSON object per line)") from None
                if not isinstance(record, dict):
                    raise UserError(f"line {i + 1} of {path} is a {type(record).__name__}, not a JSON object",
                                    field=where_row, fix="write one JSON object per line")
                yield row, record
        return
    if suffix == ".json":
        data = _json_document(path, where)
        if _is_split_mapping(data):
            name = split or "train"
            if name not in data:
                raise UserError(f"{path} holds the splits {', '.join(data)}; there is no split '{name}' in it"
                                f"{did_you_mean(name, list(data))}", field=_split_field(where),
                                fix=f"set {_split_field(where)} to one of: {', '.join(data)}")
            data = data[name]
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            n = max((len(v) for v in data.values()), default=0)
            data = [{k: (v[i] if i < len(v) else None) for k, v in data.items()} for i in range(n)]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError("a .json data file must hold a list of records or a mapping of columns", field=where,
                            fix="write one JSON object per record, or use .jsonl")
        yield from enumerate(data, start=1)
        return
    if suffix == ".csv":
        text = _utf8(path.read_bytes(), where, str(path))
        for row, record in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=1):
            yield row, dict(record)
        return
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # light (no torch); present with `datasets`

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield row, record
        return
    raise UserError(f"unsupported data file type '{suffix}'", field=where, fix=f"use one of {', '.join(FILE_FORMATS)}")


def source_columns(path: Path, where: str, split: str | None = None) -> list[str]:
    """A local source's columns, from its schema where it has one (so a first record with a column left out
    does not hide it)."""
    if path.is_dir():
        files = _saved_files(path, split, where)
        info = files[0].parent / "dataset_info.json"
        if info.is_file():
            features = json.loads(info.read_text(encoding="utf-8")).get("features") or {}
            if features:
                return list(features)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    for _, record in read_records(path, where, split):
        return list(record)
    raise UserError(f"{path} holds no record", field=where, fix=f"point {where} at a file with records")


# -- data formats (plugins) ---------------------------------------------------------------------------


def format_options(data) -> dict:
    """A recipe's data-format options: ``data.format_options``, with ``data.prefer`` (the older spelling of
    saferlhf's option) folded in."""
    options = dict(data.format_options or {})
    if data.prefer is not None:
        if data.format != "saferlhf":
            raise UserError(f"prefer: {data.prefer} only applies to data read with format: saferlhf",
                            field="data.prefer", fix="set data.format: saferlhf, or remove data.prefer")
        if options.get("prefer", data.prefer) != data.prefer:
            raise UserError(f"data.prefer ({data.prefer}) and data.format_options.prefer ({options['prefer']}) differ",
                            field="data.prefer", fix="keep one of them")
        options["prefer"] = data.prefer
    if options and data.format is None:
        raise UserError("data.format_options applies to a named data format", field="data.format_options",
                        fix="set data.format (e.g. saferlhf), or remove data.format_options")
    return options


def format_plugin(name: str | None, options: dict | None, where: str = "data.format"):
    """The data-format plugin a recipe (``where``: ``data.format``, or an entry's ``data.source[i].format``) names
    (with ``options``), or None."""
    if name is None:
        return None
    from .registry import find_plugin, hook_methods

    info = find_plugin(name)
    if "posttrain_format_record" not in hook_methods(info.cls):
        from .registry import discover

        formats = [n for n, i in discover()[0].items() if "posttrain_format_record" in i.hooks]
        raise UserError(f"plugin '{name}' is not a data format (it does not implement posttrain_format_record)",
                        field=where, fix=f"data formats: {', '.join(formats)}")
    return info.cls(info.cls.parse_options(options or {}, where=f"{where}_options"))


def detect_format(columns: list[str], record: dict):
    """The installed data format that recognises a source (posttrain_format_detect), or None."""
    from .registry import discover

    for name, info in discover()[0].items():
        if "posttrain_format_detect" in info.hooks:
            plugin = info.cls(info.cls.Options())
            if plugin.posttrain_format_detect(columns=list(columns), record=dict(record)):
                return plugin
    return None


# -- reading records ----------------------------------------------------------------------------------


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
                from .errors import PluginHookError

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
        record = _renamed_record(raw, self.before)
        if self.fmt is not None:
            try:
                record = self.fmt.posttrain_format_record(record=record, row=row)
            except UserError as e:  # name the source the row is in
                if e.field and e.field.startswith("data (row"):
                    e.field = self.where + e.field.removeprefix("data")
                    e.args = (e.render(),)
                raise
            except Exception as e:  # a bug in the format plugin: name it
                from .errors import PluginHookError

                raise PluginHookError(self.fmt.name, "posttrain_format_record", e) from e
            if not isinstance(record, dict):
                from .registry import contract_error

                raise contract_error(self.fmt.name, "posttrain_format_record", record, "the record as a dict")
            record = dict(record)
        record = _renamed_record(record, self.after)
        if self.split_conversations and _kind(record.get("messages")) == "messages":
            messages = record.pop("messages")
            if not messages or messages[-1].get("role") != "assistant":
                raise UserError(f"row {row}: the conversation ends on a {messages[-1].get('role') if messages else 'no'} "
                                "turn; its last message is the completion, and must be the assistant's reply",
                                field=f"{self.where} (row {row}, messages)",
                                fix="end every conversation on the assistant's reply, or drop that row")
            record["prompt"], record["completion"] = messages[:-1], messages[-1:]
            self.counts["conversation_split"] += 1
        for column in TEXT_COLUMNS:
            value = record.get(column)
            if isinstance(value, str):
                chat = _chat_from_text(value)
                if chat is not None:
                    record[column] = chat
                    self.counts["chat_read_from_text"] += 1
        responses = [r for r in RESPONSES if record.get(r) is not None]
        if record.get("prompt") is None and len(responses) >= 2 and self._wants_prompt():
            first, second = record[responses[0]], record[responses[1]]
            prompt = _shared_prefix(first, second)
            if prompt is not None:
                record["prompt"] = prompt
                for r in responses:
                    record[r] = record[r][len(prompt):]
                self.counts["prompt_from_shared_start"] += 1
            elif isinstance(first, str) and isinstance(second, str):
                record["prompt"] = ""  # nothing shared: pairs without a prompt (a reward model needs none)
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
        if prompt:
            repaired = False
            for r in responses:
                shorter = _without_prompt(prompt, record.get(r))
                if shorter is not None:
                    record[r] = shorter
                    repaired = True
            self.counts["prompt_removed_from_responses"] += repaired
        if self.form.system:
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
        return record

    def notes(self) -> list[str]:
        return [f"{n} {self.WORDS[k]}" for k, n in self.counts.items() if n]


# -- checks ---------------------------------------------------------------------------------------------


def _layout_for(stage: Stage, names: list[str]) -> tuple:
    """The first of the stage's layouts the columns make, or the first layout when none does."""
    return next((layout for layout in stage.layouts if set(layout) <= set(names)), stage.columns)


def check_columns(names: list[str], stage: Stage, where: str, required: dict[str, str] | None = None,
                  source_names: list[str] | None = None, at: str = "data.source") -> tuple:
    """The stage's layout the columns make (and the plugins' required columns), or a user error naming the
    columns key of the source ``at``."""
    layout = _layout_for(stage, names)
    needs = {name: f"the {stage.name} stage" for name in layout}
    needs.update({name: f"plugin '{plugin}'" for name, plugin in (required or {}).items()})
    for needed, who in needs.items():
        if needed in names:
            continue
        others = [other for other in stage.layouts if other != layout]
        alternative = (" (or " + " or ".join(", ".join(repr(c) for c in other) for other in others) + " instead)"
                       if others and needed in layout else "")
        shown = source_names if source_names is not None else names
        raise UserError(f"{who} needs a '{needed}' column{alternative}; {where} has: {', '.join(shown)}",
                        field=_key_field(at, f"columns.{needed}"),
                        fix=f"map it, e.g. `columns: {{{needed}: <your column>}}`")
    return layout


def _formats_reading(reader: Reader, names: list[str], required) -> list[str]:
    """The installed data formats that would make the stage's columns of these."""
    from .registry import discover

    out = []
    columns = {**reader.before, **reader.after}
    for name, info in discover()[0].items():
        if "posttrain_format_columns" not in info.hooks:
            continue
        try:
            other = Reader(reader.stage, columns, info.cls(info.cls.Options()), reader.where)
            check_columns(other.columns(names), reader.stage, reader.where, required, names, reader.where)
        except Exception:  # noqa: BLE001 - a format that cannot read these columns
            continue
        out.append(name)
    return out


def _mapping_hint(needed: str, mapping: dict[str, str], source_names: list[str], stage: Stage,
                  key: str = "data.columns") -> tuple | None:
    """Why a needed column is missing when the data holds it, and the fix: ``data.columns`` (``key``) moved it to
    another name (a column is read once), the data's own columns already make one of the stage's layouts, or the
    rows are unpaired feedback (a ``label``) meant for the kto stage."""
    for ours, theirs in mapping.items():
        if theirs == needed and ours != needed:
            return (f"{key} maps {ours}: {theirs}, which moves '{theirs}' to '{ours}' (a column is read once, "
                    f"so no '{needed}' is left)", f"remove {key}.{ours}, or map {ours} to another column")
    if mapping:
        for layout in stage.layouts:
            if set(layout) <= set(source_names):
                return (f"the data's own columns ({', '.join(layout)}) already make the {stage.name} stage's layout, "
                        f"and {key} takes one of them away", f"remove {key}")
    if "label" in source_names and stage.name != "kto" and any(r in source_names for r in ("completion", "messages")):
        return ("the rows have a 'label': unpaired feedback (a completion marked good or bad) is trained by the kto "
                "stage", "set `stage: kto`, or give pairs (prompt, chosen, rejected) to this stage")
    return None


def _checked_columns(reader: Reader, names: list[str], stage: Stage, source: str, required, fmt) -> tuple:
    """check_columns on what the reader makes of the source's columns; when they do not fit and no format is
    in use, the fix names the installed formats that would read them."""
    try:
        return check_columns(reader.columns(names), stage, source, required, names, reader.where)
    except UserError as e:
        key = _key_field(reader.where, "columns")
        hint = _mapping_hint(e.field.removeprefix(f"{key}."), {**reader.before, **reader.after}, names, stage, key)
        if hint:
            e.message = f"{e.message}; {hint[0]}"
            e.fix = hint[1]
            e.args = (e.render(),)
            raise
        formats = _formats_reading(reader, names, required) if fmt is None else []
        if formats:
            e.fix = f"{e.fix}; or, if the data is in that layout, set " + " or ".join(
                f"{_key_field(reader.where, 'format')}: {name}" for name in formats)
            e.args = (e.render(),)
        raise


def _value_kind(value) -> str | None:
    """'text', 'number', 'bool' (scalars), 'list', 'mapping', another type's name, or None for a null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "text"
    return {list: "list", dict: "mapping"}.get(type(value), type(value).__name__)


SCALARS = ("text", "number", "bool")


class RowChecker:
    """The checks every record gets: the layout's and the plugins' columns present and not empty, each text
    column of one kind (text or messages) throughout, conversations well formed and, for training on them,
    ending on the assistant; every other column of scalars throughout (text, numbers and booleans mixed in one
    column are read as text: ``text_columns``) or of one compound kind (lists, mappings)."""

    def __init__(self, stage: Stage, layout: tuple, required: dict[str, str] | None, where: str, plugins=None):
        self.stage, self.layout, self.where, self.plugins = stage, layout, where, plugins
        self.needed = list(layout)  # a plugin's column may hold nulls (a verifier abstains on a row without gold)
        self.kinds: dict[str, tuple[str, int]] = {}
        self.value_kinds: dict[str, dict[str, int]] = {}  # column -> {kind: first row}
        self.identical = 0
        self.rows = 0

    @property
    def text_columns(self) -> list[str]:
        """Columns whose scalars are of several kinds ("54" in one row, 22 in another): read as text."""
        return [name for name, kinds in self.value_kinds.items() if len(kinds) > 1]

    def notes(self, source: str) -> list[str]:
        return [f"{source}: column '{name}' holds " + " and ".join(
            f"{kind} (first in row {row})" for kind, row in kinds.items()) + "; every value read as text"
            for name, kinds in self.value_kinds.items() if len(kinds) > 1]

    def _check_kind(self, name: str, value, row: int) -> None:
        kind = _value_kind(value)
        if kind is None:
            return
        kinds = self.value_kinds.setdefault(name, {})
        if kind in kinds:
            return
        first, first_row = next(iter(kinds.items()), (None, None))
        if first is not None and (kind not in SCALARS or first not in SCALARS):
            raise UserError(f"row {row}: '{name}' is a {kind} where row {first_row}'s is a {first}: a column holds "
                            "one kind of value", field=f"{self.where} (row {row}, {name})",
                            fix="write every row's value the same way, or drop that row")
        kinds[kind] = row

    def check(self, record: dict, row: int) -> None:
        self.rows += 1
        for name, value in record.items():
            if name not in TEXT_COLUMNS:
                self._check_kind(name, value, row)
        for name in self.needed:
            value = record.get(name)
            if value is None or (isinstance(value, (str, list)) and len(value) == 0 and name != "prompt"):
                what = "missing" if name not in record else ("null" if value is None else "empty")
                raise UserError(f"row {row}: '{name}' is {what}", field=f"{self.where} (row {row}, {name})",
                                fix=f"give every row a {name}, or drop that row")
        for name in TEXT_COLUMNS:
            if name not in record or record[name] is None:
                continue
            kind = _kind(record[name])
            if kind not in ("text", "messages"):
                raise UserError(f"row {row}: '{name}' is a {kind}, not text or a list of messages",
                                field=f"{self.where} (row {row}, {name})", fix="fix or drop that row")
            seen = self.kinds.setdefault(name, (kind, row))
            if seen[0] != kind:
                raise UserError(f"row {row}: '{name}' is {kind} where row {seen[1]}'s is {seen[0]}: a column holds "
                                "either text or conversations", field=f"{self.where} (row {row}, {name})",
                                fix="write every row the same way (all text, or all message lists)")
            if kind == "messages":
                for i, message in enumerate(record[name]):
                    if "role" not in message or "content" not in message:
                        raise UserError(f"row {row}: message {i} of '{name}' has no role or content: {message!r}"[:300],
                                        field=f"{self.where} (row {row}, {name})",
                                        fix="messages are {role, content} mappings (ShareGPT's {from, value}: "
                                            "data.format: sharegpt)")
        if self.layout == ("messages",) and _kind(record.get("messages")) == "messages":
            last = record["messages"][-1].get("role") if record["messages"] else None
            if last != "assistant":
                raise UserError(f"row {row}: the conversation ends on a {last} turn; there is no reply to train on",
                                field=f"{self.where} (row {row}, messages)",
                                fix="end every conversation on the assistant's reply, or drop that row")
        if "chosen" in self.layout and record.get("chosen") == record.get("rejected"):
            self.identical += 1
        if self.plugins is not None:
            for plugin, problem in self.plugins.call_each("posttrain_check_record", record=dict(record), row=row,
                                                           stage=self.stage.name):
                if problem:
                    raise UserError(f"row {row}: plugin '{plugin}': {problem}", field=f"{self.where} (row {row})",
                                    fix=f"fix or drop that row, or change plugins.{plugin}'s options")


def as_text(rows: list[dict], columns: list[str]) -> None:
    """Every scalar of ``columns`` as text, in place (a column that mixes "54" and 22 is one Arrow type)."""
    for row in rows:
        for name in columns:
            value = row.get(name)
            if value is not None and not isinstance(value, str):
                row[name] = json.dumps(value) if isinstance(value, bool) else str(value)


def check_pairs_differ(checker: RowChecker, source: str, where: str) -> None:
    """Pairs whose two responses are the same teach nothing and are dropped; when that is every pair, the
    stage would have no data."""
    if checker.identical and checker.identical == checker.rows:
        raise UserError(f"every one of the {checker.rows} pairs of {source} has chosen == rejected, so every pair "
                        "would be dropped and nothing is left to train on", field=where,
                        fix="check data.columns: chosen and rejected must name the two different responses")


def _split_for(source: str, split: str | None, where: str) -> None:
    """A file (or a built-in dataset) has one split: asking for another one would silently read the training
    rows."""
    if not source.startswith("builtin:") and file_splits(Path(source).expanduser()) is not None:
        return  # a .json file of several splits: read_records picks the split, or names the ones there are
    if split not in (None, "train"):
        what = "a built-in dataset" if source.startswith("builtin:") else "a file"
        field = _split_field(where)
        raise UserError(f"'{source}' is {what}, which has one split; there is no split '{split}' in it",
                        field=field, fix="hold out a fraction of it (data.eval.fraction) or give the held-out rows as "
                                         "data.eval.source; splits apply to hub datasets and saved DatasetDicts")


def check_source(source: str, *, columns: dict, options: dict, stage: Stage, where: str,
                 required: dict[str, str] | None = None, format: str | None = None,  # noqa: A002 - the recipe key
                 format_options: dict | None = None, split: str | None = None, plugins=None,
                 form: PromptForm | None = None, subset: str | None = None) -> list[str]:
    """Validate a data source without loading a model: its columns, and for a local source every row of its split
    (or of the split's slice; the enabled ``plugins``' ``posttrain_check_record`` included). ``required``: extra
    column -> plugin needing it. Returns notes to show (repairs, detected format)."""
    return _check_source(source, columns=columns, options=options, stage=stage, where=where, required=required,
                         format=format, format_options=format_options, split=split, plugins=plugins, form=form,
                         subset=subset)[0]


def _hub_split_name(split: str | None) -> str:
    """The first split a split string for ``load_dataset`` names (``train`` of ``train[:5%]+test``)."""
    return re.split(r"[\[+(]", split or "train", maxsplit=1)[0].strip()


def _check_source(source: str, *, columns: dict, options: dict, stage: Stage, where: str,
                  required: dict[str, str] | None, format: str | None,  # noqa: A002 - the recipe key
                  format_options: dict | None, split: str | None, plugins, form: PromptForm | None,
                  subset: str | None) -> tuple[list[str], tuple | None]:
    """check_source's notes, and what it found of a local or built-in source's rows, for a mix's checks across
    its sources: (its layout, its RowChecker or None for a built-in one); None for a hub dataset."""
    kind = source_kind(source)
    notes: list[str] = []
    fmt = format_plugin(format, format_options, _key_field(where, "format"))
    if subset is not None and kind != "dataset":
        raise UserError(f"subset: {subset} names a configuration of a hub dataset, and '{source}' is a local source",
                        field=_key_field(where, "subset"), fix="remove subset (it applies to hub datasets and data "
                                                               "folders whose README.md defines configurations)")
    part = parse_split(split, where) if kind != "dataset" else None
    split = part.name if part is not None else split
    if kind == "builtin":
        name = source.split(":", 1)[1]
        gen = BUILTIN_DATASETS.get(name)
        if gen is None:
            raise UserError(f"unknown built-in dataset '{name}'{did_you_mean(name, BUILTIN_DATASETS)}",
                            field=where, fix=f"built-in datasets: {', '.join(BUILTIN_DATASETS)}")
        _split_for(source, split, where)
        opts = parse_options(gen.options, options, where=_key_field(where, "options"),
                             owner=f"built-in dataset '{name}'")
        names = gen.columns(opts)
        layout = _checked_columns(Reader(stage, columns, fmt, where, form, builtin=True), names, stage, source,
                                  required, fmt)
        return notes, (layout, None)
    if kind == "dataset":
        if options:
            raise UserError(f"{_key_field(where, 'options')} only applies to built-in datasets",
                            field=_key_field(where, "options"), fix=f"remove {_key_field(where, 'options')}")
        path = Path(source).expanduser()
        splits = folder_splits(path) if path.is_dir() and subset is None else None
        name = _hub_split_name(split)
        if splits is not None and name not in splits:
            raise UserError(f"the data folder '{source}' has the splits {', '.join(splits)} (by its files' names); "
                            f"there is no split '{name}'{did_you_mean(name, splits)}",
                            field=_split_field(where), fix=f"set {_split_field(where)} to one of: {', '.join(splits)}")
        return notes, None  # a hub dataset or a folder of data files: read when the run loads it
    path = Path(source).expanduser()
    if kind == "file":
        if not path.is_file():
            raise UserError(f"data file '{source}' does not exist", field=where,
                            fix="check the path (relative paths are from the recipe's folder, else the directory you "
                                "run posttrain in)")
        if path.suffix.lower() not in FILE_FORMATS:
            raise UserError(f"unsupported data file type '{path.suffix}'", field=where,
                            fix=f"use one of {', '.join(FILE_FORMATS)}")
        _split_for(source, split, where)
    if options:
        raise UserError(f"{_key_field(where, 'options')} only applies to built-in datasets",
                        field=_key_field(where, "options"), fix=f"remove {_key_field(where, 'options')}")
    names = source_columns(path, where, split)
    first = next(iter(read_records(path, where, split)), (1, {}))[1]
    if fmt is None:
        fmt = detect_format(names, first)
        if fmt is not None:
            notes.append(f"{source}: read as format {fmt.name} (detected; set "
                         f"{_key_field(where, 'format')} to choose another)")
    reader = Reader(stage, columns, fmt, where, form)
    layout = _checked_columns(reader, names, stage, source, required, fmt)
    checker = RowChecker(stage, layout, required, where, plugins)
    for row, raw in _in_slice(lambda: read_records(path, where, split), part):
        checker.check(reader.record(raw, row), row)
    check_pairs_differ(checker, source, where)
    notes += [f"{source}: {note}" for note in reader.notes()] + checker.notes(source)
    if checker.identical:
        notes.append(f"{source}: {checker.identical} pair(s) with chosen == rejected will be dropped (they teach nothing)")
    return notes, (layout, checker)


# -- several sources ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One source of a stage's data and the keys that read it: ``data.source`` with the data section's keys, or
    an entry of a list of sources (``where``: ``data.source[i]``) with its own."""

    source: str
    split: str | None
    subset: str | None
    columns: dict
    format: str | None
    format_options: dict
    options: dict
    where: str
    fraction: float | None = None
    count: int | None = None

    def describe(self) -> str:
        """The source as one line: where it is, its split and subset, the share of it used."""
        parts = [f"split {self.split or 'train'}"] + ([f"subset {self.subset}"] if self.subset else [])
        if self.fraction is not None:
            parts.append(f"fraction {self.fraction:g}")
        if self.count is not None:
            parts.append(f"count {self.count}")
        return f"{self.source} ({', '.join(parts)})"


def training_sources(data) -> list[Source]:
    """The sources of a recipe's training data (its ``data`` section), in order; an entry's ``fraction`` and
    ``count`` checked."""
    if not isinstance(data.source, list):
        return [Source(data.source, data.split, data.subset, data.columns, data.format, format_options(data),
                       data.options, "data.source")]
    out = []
    for i, entry in enumerate(data.source):
        where = f"data.source[{i}]"
        if entry.format_options and entry.format is None:
            raise UserError("format_options applies to a named data format", field=f"{where}.format_options",
                            fix=f"set {where}.format, or remove {where}.format_options")
        if entry.fraction is not None and entry.count is not None:
            raise UserError("fraction and count both say how many rows to use", field=f"{where}.count",
                            fix="keep one of them")
        if entry.fraction is not None and entry.fraction <= 0:
            raise UserError(f"must be above 0, got {entry.fraction}", field=f"{where}.fraction",
                            fix="use e.g. 0.5 for half its rows, 2 for two copies (or remove the entry)")
        if entry.count is not None and entry.count < 1:
            raise UserError(f"must be at least 1, got {entry.count}", field=f"{where}.count",
                            fix="give the number of rows to use (or remove the entry)")
        out.append(Source(entry.source, entry.split, entry.subset, entry.columns, entry.format, entry.format_options,
                          entry.options, where, entry.fraction, entry.count))
    return out


def eval_source(data) -> Source | None:
    """The held-out data's source when it is read from a source or a split (None for a fraction of the training
    data): ``data.eval.source``, read with the data section's columns and format (with a list of sources, as it
    is: in the stage's columns, its format detected), or ``data.eval.split`` of the single ``data.source``."""
    ev = data.eval
    mix = isinstance(data.source, list)
    if ev.source:
        if mix:
            return Source(ev.source, ev.split, None, {}, None, {}, {}, "data.eval.source")
        return Source(ev.source, ev.split, None, data.columns, data.format, format_options(data), {},
                      "data.eval.source")
    if ev.split and not mix:
        return Source(data.source, ev.split, data.subset, data.columns, data.format, format_options(data),
                      data.options, "data.eval.split")
    return None


def sample_rows(rows: int, fraction: float | None, count: int | None, seed: int) -> list[int]:
    """The indices of the rows a source's ``fraction`` or ``count`` uses, of its ``rows``: ``count``, or
    ``fraction`` x rows rounded to the closest row; up to ``rows`` of them, ``random.Random(seed).sample`` of the
    row indices, in the source's order; more, whole copies of every row (as open-instruct's mixer upsamples), then a
    sample of the rest drawn the same way. Every row without either."""
    if fraction is None and count is None:
        return list(range(rows))
    wanted = count if count is not None else int(round(fraction * rows))
    copies, rest = divmod(wanted, rows) if rows else (0, 0)
    return list(range(rows)) * copies + sorted(random.Random(seed).sample(range(rows), rest))


def _check_mix(parts: list[tuple[Source, tuple | None]], stage: Stage) -> list[str]:
    """The sources of a mix make one layout of the stage's columns, and a column holds one kind of value in all of
    them (text or conversations; scalars of several kinds are read as text, returned). ``parts``: each source with
    (its layout, its RowChecker or None), or None where its rows are not known yet."""
    known = [(src, info) for src, info in parts if info is not None]
    if not known:
        return []
    first, (layout, _) = known[0]
    for src, (other, _) in known[1:]:
        if other != layout:
            raise UserError(f"{src.where} ({src.source}) is read as the {stage.name} stage's columns "
                            f"{', '.join(other)}, and {first.where} ({first.source}) as {', '.join(layout)}: the rows "
                            "of a mix are of one layout", field=src.where,
                            fix=f"map its columns ({src.where}.columns) or give it a format so that it makes "
                                f"{', '.join(layout)}, or train it in a stage of its own")
    texts: dict[str, tuple[str, Source]] = {}
    values: dict[str, dict[str, Source]] = {}
    for src, (_, checker) in known:
        if checker is None:
            continue
        for name, (kind, _row) in checker.kinds.items():
            seen = texts.setdefault(name, (kind, src))
            if seen[0] != kind:
                raise UserError(f"'{name}' is {kind} in {src.where} ({src.source}) and {seen[0]} in "
                                f"{seen[1].where} ({seen[1].source}): a column of a mix holds either text or "
                                "conversations", field=src.where,
                                fix="write every source's column the same way (all text, or all message lists; "
                                    "data.prompt_format: chat makes text prompts a user turn)")
        for name, kinds in checker.value_kinds.items():
            for kind in kinds:
                values.setdefault(name, {}).setdefault(kind, src)
    text_columns = []
    for name, kinds in values.items():
        if len(kinds) < 2:
            continue
        if any(kind not in SCALARS for kind in kinds):
            (a, sa), (b, sb) = list(kinds.items())[:2]
            raise UserError(f"'{name}' holds a {a} in {sa.where} ({sa.source}) and a {b} in {sb.where} "
                            f"({sb.source}): a column holds one kind of value", field=sb.where,
                            fix=f"write the column the same way in every source, or rename one "
                                f"({sb.where}.columns)")
        text_columns.append(name)
    return text_columns


def check_mix(data, *, stage: Stage, required: dict[str, str] | None = None, plugins=None,
              form: PromptForm | None = None) -> list[str]:
    """Validate a list of sources without loading a model: each on its own (check_source, errors naming
    ``data.source[i]``), then the mix (one layout, one kind of value per column). Returns notes to show."""
    notes: list[str] = []
    parts = []
    for src in training_sources(data):
        if is_ref(src.source):  # an earlier stage's dataset is checked when it exists
            if src.subset is not None:
                raise UserError(f"subset: {src.subset} names a configuration of a hub dataset, and '{src.source}' is "
                                "a pipeline stage's dataset", field=f"{src.where}.subset", fix="remove subset")
            parse_split(src.split, src.where)
            parts.append((src, None))
            continue
        found, info = _check_source(src.source, columns=src.columns, options=src.options, stage=stage,
                                    where=src.where, required=required, format=src.format,
                                    format_options=src.format_options, split=src.split, plugins=plugins, form=form,
                                    subset=src.subset)
        notes += found
        parts.append((src, info))
    for name in _check_mix(parts, stage):
        notes.append(f"column '{name}' holds text in some sources and numbers or booleans in others; every value "
                     "read as text")
    return notes


# -- loading --------------------------------------------------------------------------------------------


def _source_records(source: str, split: str | None, options: dict, where: str) -> tuple[list[str], list[dict]]:
    """A source's column names and records, as they are (before any format or renames); a slice of a local
    split (``train[:5%]``) applied."""
    names, records, _ = _source_rows(source, split, options, where)
    return names, records


def _source_rows(source: str, split: str | None, options: dict, where: str,
                 subset: str | None = None) -> tuple[list[str], list[dict], int]:
    """_source_records, and the number of the first record's row in the source (1, or where its slice starts).
    A hub dataset (or a data folder) is read by ``datasets.load_dataset(source, subset, split=split)``, which
    reads the slice itself."""
    if is_ref(source):  # the dataset an earlier stage of the pipeline wrote
        source = dataset_path(source)
    kind = source_kind(source)
    part = parse_split(split, where) if kind != "dataset" else None
    split = part.name if part is not None else split
    if kind == "builtin":
        gen = BUILTIN_DATASETS[source.split(":", 1)[1]]
        opts = parse_options(gen.options, options, where=_key_field(where, "options"), owner=source)
        records = list(gen.fn(opts))
        names = list(records[0]) if records else gen.columns(opts)
        start, stop = part.bounds(len(records)) if part is not None else (0, len(records))
        return names, records[start:stop], start + 1
    if kind in ("file", "saved"):
        path = Path(source).expanduser()
        if kind == "file":
            _split_for(source, split, where)
        split = split if kind == "saved" or file_splits(path) is not None else None
        names = source_columns(path, where, split)
        pairs = list(_in_slice(lambda: read_records(path, where, split), part))
        return names, [record for _, record in pairs], pairs[0][0] if pairs else 1
    import datasets

    try:
        dataset = datasets.load_dataset(source, subset, split=split or "train")
    except Exception as e:  # offline, private, misspelt, no such split...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        of = f"split {split or 'train'}" + (f", subset {subset}" if subset is not None else "")
        raise UserError(f"cannot load dataset '{source}' ({of}): {type(e).__name__}: {first_line}",
                        field=where, fix="check the id/folder, the split and the subset, or point at a local data "
                                         "file") from None
    return list(dataset.column_names), list(dataset), 1


@dataclass
class _Read:
    """One source's rows in the stage's columns, read and checked, and what was found on the way."""

    rows: list[dict]
    columns: list[str]  # the stage's columns the reader makes of the source's (for an empty dataset)
    layout: tuple
    checker: RowChecker
    rows_read: int  # before any was dropped
    log: list[dict]


def _read_source(recipe, src: Source, fmt, required: dict[str, str] | None, name: str, plugins=None,
                 form: PromptForm | None = None) -> _Read:
    """Every record of one source read as the stage's and checked; pairs whose two responses are the same
    dropped (logged for summary.json's ``data_transforms``)."""
    stage, source, where = recipe.kind, src.source, src.where
    names, records, first_row = _source_rows(source, src.split, src.options, where, src.subset)
    log: list[dict] = []
    if fmt is None and records:
        fmt = detect_format(names, records[0])
        if fmt is not None:
            log.append({"plugin": f"data format {fmt.name}", "split": name, "rows_in": len(records),
                        "rows_out": len(records),
                        "reason": f"detected; set {_key_field(where, 'format')} to choose another"})
    reader = Reader(stage, src.columns, fmt, where, form, builtin=source.startswith("builtin:"))
    layout = _checked_columns(reader, names, stage, where, required, fmt)
    checker = RowChecker(stage, layout, required, where, plugins)
    rows = []
    for i, raw in enumerate(records, start=first_row):
        record = reader.record(raw, i)
        checker.check(record, i)
        rows.append(record)
    check_pairs_differ(checker, source, where)
    as_text(rows, checker.text_columns)
    for note in reader.notes() + [n.split(": ", 1)[1] for n in checker.notes(source)]:
        log.append({"plugin": "posttrain (data)", "split": name, "rows_in": len(rows), "rows_out": len(rows),
                    "reason": note})
    read = len(rows)
    if checker.identical:
        rows = [r for r in rows if r.get("chosen") != r.get("rejected")]
        log.append({"plugin": "posttrain (data)", "split": name, "rows_in": read, "rows_out": len(rows),
                    "reason": "pairs with chosen == rejected dropped (they teach nothing)"})
    return _Read(rows, reader.columns(names), layout, checker, read, log)


def _dataset(rows: list[dict], columns: list[str]):
    """Rows as a ``datasets.Dataset`` (with these columns when there is no row)."""
    import datasets

    return datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({c: [] for c in columns})


def _as_dataset(read: _Read) -> tuple[Any, list[dict]]:
    return _dataset(read.rows, read.columns), read.log


def _source_entry(src: Source, read: _Read, used: int) -> dict:
    """A source's entry in summary.json's ``data_sources``."""
    return {"source": src.source, "split": src.split or "train", "subset": src.subset, "rows_read": read.rows_read,
            "rows_used": used}


def source_counts(entry: dict) -> str:
    """A ``data_sources`` entry as one line: the source, its split and subset, its rows used and read."""
    subset = f", subset {entry['subset']}" if entry.get("subset") else ""
    return (f"{entry['source']} (split {entry['split']}{subset}): {entry['rows_used']} rows used of "
            f"{entry['rows_read']} read")


def read_mix(recipe, required: dict[str, str] | None = None, plugins=None, form: PromptForm | None = None,
             sources: list | None = None) -> tuple[Any, list[dict]]:
    """The training data of a list of sources as one ``datasets.Dataset``: each source read and checked on its
    own (errors name ``data.source[i]``), its ``fraction`` or ``count`` of rows sampled (``sample_rows``, seeded
    with the recipe's seed plus the entry's index), the rows concatenated in the order given; a column some
    sources lack is null in their rows. ``sources`` receives each source's row counts."""
    parts, reads, log = [], [], []
    for i, src in enumerate(training_sources(recipe.data)):
        fmt = format_plugin(src.format, src.format_options, f"{src.where}.format")
        read = _read_source(recipe, src, fmt, required, "train", plugins, form)
        if (src.fraction is not None or src.count is not None) and not read.rows:
            share = "fraction" if src.count is None else "count"
            raise UserError(f"{src.where} ({src.source}) has no rows to take a {share} of", field=src.where,
                            fix="point it at some rows, or remove the entry")
        read.rows = [read.rows[j] for j in sample_rows(len(read.rows), src.fraction, src.count, recipe.seed + i)]
        for entry in read.log:
            entry["reason"] = f"{src.where}: {entry['reason']}"
        parts.append((src, (read.layout, read.checker)))
        reads.append(read)
        log += read.log
        if sources is not None:
            sources.append(_source_entry(src, read, len(read.rows)))
    text = _check_mix(parts, recipe.kind)
    columns = list(dict.fromkeys([c for read in reads for c in read.columns] +
                                 [c for read in reads for row in read.rows for c in row]))
    rows = [{c: row.get(c) for c in columns} for read in reads for row in read.rows]
    as_text(rows, text)
    for name in text:
        log.append({"plugin": "posttrain (data)", "split": "train", "rows_in": len(rows), "rows_out": len(rows),
                    "reason": f"column '{name}' holds text in some sources and numbers or booleans in others; every "
                              "value read as text"})
    return _dataset(rows, columns), log


def load_splits(recipe, required: dict[str, str] | None = None, plugins=None,
                form: PromptForm | None = None, sources: list | None = None) -> tuple[Any, Any, list[dict]]:
    """The training and held-out datasets of a recipe, read as the stage's records and checked (by the enabled
    ``plugins`` too); and what was repaired or dropped on the way (entries for summary.json's
    ``data_transforms``). ``sources``, when given, receives each training source's row counts (summary.json's
    ``data_sources``: the rows read from its split or slice, and the rows it gives the data before
    ``data.eval.fraction`` holds some out)."""
    data = recipe.data
    if isinstance(data.source, list):
        train, log = read_mix(recipe, required, plugins, form, sources)
    else:
        src = training_sources(data)[0]
        read = _read_source(recipe, src, format_plugin(data.format, format_options(data)), required, "train",
                            plugins, form)
        if sources is not None:
            sources.append(_source_entry(src, read, len(read.rows)))
        train, log = _as_dataset(read)
    held = None
    ev = data.eval
    held_src = eval_source(data)
    if held_src is not None:
        fmt = format_plugin(held_src.format, held_src.format_options)
        held, held_log = _as_dataset(_read_source(recipe, held_src, fmt, required, "eval", plugins, form))
        log += held_log
    elif ev.fraction > 0:
        parts = train.train_test_split(test_size=ev.fraction, seed=recipe.seed)
        train, held = parts["train"], parts["test"]
    if data.max_examples is not None:
        train = train.select(range(min(data.max_examples, len(train))))
    if held is not None and ev.max_examples is not None:
        held = held.select(range(min(ev.max_examples, len(held))))
    return train, held, log
