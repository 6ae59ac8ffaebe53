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
"""

from __future__ import annotations

import ast
import csv
import io
import json
from collections.abc import Iterator
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
        raise UserError(f"'{path}' holds no .arrow file", field="data.source",
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
    return {"data.source": "data.split", "data.eval.source": "data.eval.split"}.get(where, where)


def file_splits(path: Path) -> list[str] | None:
    """The splits of a local file that holds several (a .json mapping of split names to records), else None."""
    if path.suffix.lower() != ".json" or not path.is_file() or not _starts_json_document(path):
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return list(data) if _is_split_mapping(data) else None


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
    """The data-format plugin a recipe names (with ``options``), or None."""
    if name is None:
        return None
    from .registry import find_plugin, hook_methods

    info = find_plugin(name)
    if "posttrain_format_record" not in hook_methods(info.cls):
        from .registry import discover

        formats = [n for n, i in discover()[0].items() if "posttrain_format_record" in i.hooks]
        raise UserError(f"plugin '{name}' is not a data format (it does not implement posttrain_format_record)",
                        field=where, fix=f"data formats: {', '.join(formats)}")
    return info.cls(info.cls.parse_options(options or {}, where="data.format_options"))


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


class Reader:
    """How one source's records become the stage's (see the module's docstring), with the repairs counted."""

    WORDS = {"chat_read_from_text": "conversations written as text read as messages",
             "prompt_from_shared_start": "rows without a prompt: the start their two responses share taken as the "
                                         "prompt",
             "prompt_removed_from_responses": "rows whose responses repeated the prompt: the prompt removed from "
                                              "them",
             "prompt_text_as_user_turn": "text prompts of conversational responses read as a user turn",
             "response_text_as_assistant_turn": "text responses to a conversation read as an assistant turn"}

    def __init__(self, stage: Stage, columns: dict[str, str], fmt=None, where: str = "data.source"):
        self.stage, self.fmt, self.where = stage, fmt, where
        layout = set(getattr(type(fmt), "layout", ()) or ()) if fmt is not None else set()
        self.before = {ours: theirs for ours, theirs in columns.items() if ours in layout}
        self.after = {ours: theirs for ours, theirs in columns.items() if ours not in layout}
        self.counts = dict.fromkeys(self.WORDS, 0)

    def _check_mapping(self, mapping: dict[str, str], names: list[str]) -> None:
        for ours, theirs in mapping.items():
            if theirs not in names:
                raise UserError(f"column mapping {ours}: {theirs} names a column the data does not have"
                                f"{did_you_mean(theirs, names)}; it has: {', '.join(names)}",
                                field=f"data.columns.{ours}", fix="map to one of the data's columns")

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
        return record

    def notes(self) -> list[str]:
        return [f"{n} {self.WORDS[k]}" for k, n in self.counts.items() if n]


# -- checks ---------------------------------------------------------------------------------------------


def _layout_for(stage: Stage, names: list[str]) -> tuple:
    """The first of the stage's layouts the columns make, or the first layout when none does."""
    return next((layout for layout in stage.layouts if set(layout) <= set(names)), stage.columns)


def check_columns(names: list[str], stage: Stage, where: str, required: dict[str, str] | None = None,
                  source_names: list[str] | None = None) -> tuple:
    """The stage's layout the columns make (and the plugins' required columns), or a user error."""
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
                        field=f"data.columns.{needed}", fix=f"map it, e.g. `columns: {{{needed}: <your column>}}`")
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
            check_columns(other.columns(names), reader.stage, reader.where, required, names)
        except Exception:  # noqa: BLE001 - a format that cannot read these columns
            continue
        out.append(name)
    return out


def _mapping_hint(needed: str, mapping: dict[str, str], source_names: list[str], stage: Stage) -> tuple | None:
    """Why a needed column is missing when the data holds it, and the fix: ``data.columns`` moved it to another
    name (a column is read once), the data's own columns already make one of the stage's layouts, or the rows
    are unpaired feedback (a ``label``) meant for the kto stage."""
    for ours, theirs in mapping.items():
        if theirs == needed and ours != needed:
            return (f"data.columns maps {ours}: {theirs}, which moves '{theirs}' to '{ours}' (a column is read once, "
                    f"so no '{needed}' is left)", f"remove data.columns.{ours}, or map {ours} to another column")
    if mapping:
        for layout in stage.layouts:
            if set(layout) <= set(source_names):
                return (f"the data's own columns ({', '.join(layout)}) already make the {stage.name} stage's layout, "
                        "and data.columns takes one of them away", "remove data.columns")
    if "label" in source_names and stage.name != "kto" and any(r in source_names for r in ("completion", "messages")):
        return ("the rows have a 'label': unpaired feedback (a completion marked good or bad) is trained by the kto "
                "stage", "set `stage: kto`, or give pairs (prompt, chosen, rejected) to this stage")
    return None


def _checked_columns(reader: Reader, names: list[str], stage: Stage, source: str, required, fmt) -> tuple:
    """check_columns on what the reader makes of the source's columns; when they do not fit and no format is
    in use, the fix names the installed formats that would read them."""
    try:
        return check_columns(reader.columns(names), stage, source, required, names)
    except UserError as e:
        hint = _mapping_hint(e.field.removeprefix("data.columns."), {**reader.before, **reader.after}, names, stage)
        if hint:
            e.message = f"{e.message}; {hint[0]}"
            e.fix = hint[1]
            e.args = (e.render(),)
            raise
        formats = _formats_reading(reader, names, required) if fmt is None else []
        if formats:
            e.fix = f"{e.fix}; or, if the data is in that layout, set " + " or ".join(
                f"data.format: {name}" for name in formats)
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
                 format_options: dict | None = None, split: str | None = None, plugins=None) -> list[str]:
    """Validate a data source without loading a model: its columns, and for a local source every row (the
    enabled ``plugins``' ``posttrain_check_record`` included). ``required``: extra column -> plugin needing it.
    Returns notes to show (repairs, detected format)."""
    kind = source_kind(source)
    notes: list[str] = []
    fmt = format_plugin(format, format_options)
    if kind == "builtin":
        name = source.split(":", 1)[1]
        gen = BUILTIN_DATASETS.get(name)
        if gen is None:
            raise UserError(f"unknown built-in dataset '{name}'{did_you_mean(name, BUILTIN_DATASETS)}",
                            field=where, fix=f"built-in datasets: {', '.join(BUILTIN_DATASETS)}")
        _split_for(source, split, where)
        opts = parse_options(gen.options, options, where="data.options", owner=f"built-in dataset '{name}'")
        names = gen.columns(opts)
        _checked_columns(Reader(stage, columns, fmt, where), names, stage, source, required, fmt)
        return notes
    if kind == "dataset":
        if options:
            raise UserError("data.options only applies to built-in datasets", field="data.options",
                            fix="remove data.options")
        path = Path(source).expanduser()
        splits = folder_splits(path) if path.is_dir() else None
        if splits is not None and (split or "train") not in splits:
            raise UserError(f"the data folder '{source}' has the splits {', '.join(splits)} (by its files' names); "
                            f"there is no split '{split or 'train'}'{did_you_mean(split or 'train', splits)}",
                            field=_split_field(where), fix=f"set {_split_field(where)} to one of: {', '.join(splits)}")
        return notes  # a hub dataset or a folder of data files: read when the run loads it
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
        raise UserError("data.options only applies to built-in datasets", field="data.options", fix="remove data.options")
    names = source_columns(path, where, split)
    first = next(iter(read_records(path, where, split)), (1, {}))[1]
    if fmt is None:
        fmt = detect_format(names, first)
        if fmt is not None:
            notes.append(f"{source}: read as format {fmt.name} (detected; set data.format to choose another)")
    reader = Reader(stage, columns, fmt, where)
    layout = _checked_columns(reader, names, stage, source, required, fmt)
    checker = RowChecker(stage, layout, required, where, plugins)
    for row, raw in read_records(path, where, split):
        checker.check(reader.record(raw, row), row)
    check_pairs_differ(checker, source, where)
    notes += [f"{source}: {note}" for note in reader.notes()] + checker.notes(source)
    if checker.identical:
        notes.append(f"{source}: {checker.identical} pair(s) with chosen == rejected will be dropped (they teach nothing)")
    return notes


# -- loading --------------------------------------------------------------------------------------------


def _source_records(source: str, split: str | None, options: dict, where: str) -> tuple[list[str], list[dict]]:
    """A source's column names and records, as they are (before any format or renames)."""
    if is_ref(source):  # the dataset an earlier stage of the pipeline wrote
        source = dataset_path(source)
    kind = source_kind(source)
    if kind == "builtin":
        gen = BUILTIN_DATASETS[source.split(":", 1)[1]]
        opts = parse_options(gen.options, options, where="data.options", owner=source)
        records = list(gen.fn(opts))
        return (list(records[0]) if records else gen.columns(opts)), records
    if kind in ("file", "saved"):
        path = Path(source).expanduser()
        if kind == "file":
            _split_for(source, split, where)
        split = split if kind == "saved" or file_splits(path) is not None else None
        names = source_columns(path, where, split)
        return names, [record for _, record in read_records(path, where, split)]
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split or "train")
    except Exception as e:  # offline, private, misspelt, no such split...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"cannot load dataset '{source}' (split {split or 'train'}): {type(e).__name__}: {first_line}",
                        field=where, fix="check the id/folder and the split, or point at a local data file") from None
    return list(dataset.column_names), list(dataset)


def read_split(recipe, source: str, split: str | None, options: dict, where: str, fmt,
               required: dict[str, str] | None, name: str, plugins=None) -> tuple[Any, list[dict]]:
    """One split of a recipe's data as a ``datasets.Dataset`` in the stage's columns, every record read and
    checked; and what was repaired or dropped (entries for summary.json's ``data_transforms``)."""
    import datasets

    stage = recipe.kind
    names, records = _source_records(source, split, options, where)
    log: list[dict] = []
    if fmt is None and records:
        fmt = detect_format(names, records[0])
        if fmt is not None:
            log.append({"plugin": f"data format {fmt.name}", "split": name, "rows_in": len(records),
                        "rows_out": len(records), "reason": "detected; set data.format to choose another"})
    reader = Reader(stage, recipe.data.columns, fmt, where)
    layout = _checked_columns(reader, names, stage, where, required, fmt)
    checker = RowChecker(stage, layout, required, where, plugins)
    rows = []
    for i, raw in enumerate(records, start=1):
        record = reader.record(raw, i)
        checker.check(record, i)
        rows.append(record)
    check_pairs_differ(checker, source, where)
    as_text(rows, checker.text_columns)
    for note in reader.notes() + [n.split(": ", 1)[1] for n in checker.notes(source)]:
        log.append({"plugin": "posttrain (data)", "split": name, "rows_in": len(rows), "rows_out": len(rows),
                    "reason": note})
    if checker.identical:
        before = len(rows)
        rows = [r for r in rows if r.get("chosen") != r.get("rejected")]
        log.append({"plugin": "posttrain (data)", "split": name, "rows_in": before, "rows_out": len(rows),
                    "reason": "pairs with chosen == rejected dropped (they teach nothing)"})
    if not rows:
        return datasets.Dataset.from_dict({c: [] for c in reader.columns(names)}), log
    return datasets.Dataset.from_list(rows), log


def load_splits(recipe, required: dict[str, str] | None = None, plugins=None) -> tuple[Any, Any, list[dict]]:
    """The training and held-out datasets of a recipe, read as the stage's records and checked (by the enabled
    ``plugins`` too); and what was repaired or dropped on the way (entries for summary.json's
    ``data_transforms``)."""
    data = recipe.data
    fmt = format_plugin(data.format, format_options(data))
    train, log = read_split(recipe, data.source, data.split, data.options, "data.source", fmt, required, "train",
                            plugins)
    held = None
    ev = data.eval
    if ev.source or ev.split:
        where = "data.eval.source" if ev.source else "data.eval.split"
        held, held_log = read_split(recipe, ev.source or data.source, ev.split,
                                    data.options if not ev.source else {}, where, fmt, required, "eval", plugins)
        log += held_log
    elif ev.fraction > 0:
        parts = train.train_test_split(test_size=ev.fraction, seed=recipe.seed)
        train, held = parts["train"], parts["test"]
    if data.max_examples is not None:
        train = train.select(range(min(data.max_examples, len(train))))
    if held is not None and ev.max_examples is not None:
        held = held.select(range(min(ev.max_examples, len(held))))
    return train, held, log
