"""Local data on disk: files (``.jsonl``, ``.json``, ``.csv``, ``.parquet``), folders written by ``datasets``'
``save_to_disk``, and the splits they hold (a saved ``DatasetDict``, a ``.json`` mapping of split names to records,
a folder of data files named by split). :func:`read_records` reads every record of one split in order, numbered
from 1, and refuses the first row that cannot be read (bytes that are not UTF-8, a line that is not JSON, a record
that is not a mapping) naming it; :func:`source_columns` gives a source's columns."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from ..errors import UserError, did_you_mean
from .keys import _split_field

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file())


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
        yield from _saved_records(path, where, split)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not _starts_json_document(path)):
        yield from _json_lines(path, where)
        return
    if suffix == ".json":
        yield from enumerate(_json_document_records(path, where, split), start=1)
        return
    if suffix == ".csv":
        text = _utf8(path.read_bytes(), where, str(path))
        for row, record in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=1):
            yield row, dict(record)
        return
    if suffix == ".parquet":
        yield from _parquet_records(path)
        return
    raise UserError(f"unsupported data file type '{suffix}'", field=where, fix=f"use one of {', '.join(FILE_FORMATS)}")


def _saved_records(path: Path, where: str, split: str | None) -> Iterator[tuple[int, dict]]:
    """read_records of a folder written by ``save_to_disk``: the .arrow files of its split, in order."""
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


def _json_lines(path: Path, where: str) -> Iterator[tuple[int, dict]]:
    """read_records of a file of JSON lines (blank lines skipped), streamed: a large file is never held whole."""
    row = 0
    with path.open("rb") as f:
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


def _json_document_records(path: Path, where: str, split: str | None) -> list[dict]:
    """The records of a .json document: a list of records, a mapping of columns, or a mapping of splits (the
    one ``split`` names, ``train`` by default)."""
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
    return data


def _parquet_records(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq  # light (no torch); present with `datasets`

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield row, record


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
