"""Where training data comes from: built-in generators, local files, or a hub dataset.

``check_source`` runs during validation, before any model or heavy library is loaded: a missing
file or a missing column is reported there. ``load_splits`` builds the real
``datasets.Dataset`` objects for a run.

A data ``format`` maps another layout to the stage's columns, seen the same way by both:
``saferlhf`` reads PKU-SafeRLHF's pairs (``prompt``, ``response_0``, ``response_1``,
``is_response_0_safe``, ``is_response_1_safe``, ``better_response_id``, ``safer_response_id``) as
``prompt``/``chosen``/``rejected`` with the chosen response picked by ``prefer`` (``safer`` or
``better``), and the per-response safety labels as ``is_chosen_safe``/``is_rejected_safe``. The
label columns are kept; ``response_0``/``response_1`` are dropped (they are chosen/rejected).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .builtin import BUILTIN_DATASETS
from .errors import UserError, did_you_mean
from .plugin import parse_options
from .stage import Stage
from .stage_refs import dataset_path, is_ref

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def source_kind(source: str) -> str:
    """'builtin', 'file', or 'dataset' (a hub id or a local dataset folder, read by datasets.load_dataset)."""
    if source.startswith("builtin:"):
        return "builtin"
    p = Path(source).expanduser()
    if p.is_dir():
        return "dataset"
    if p.suffix.lower() in FILE_FORMATS or source.startswith((".", "/", "~")) or p.exists():
        return "file"
    return "dataset"


def _peek_columns(path: Path, where: str) -> tuple[list[str], dict]:
    """Column names and the first record of a local data file, read cheaply."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or suffix == ".json":
        text_start = path.open(encoding="utf-8").read(1 << 16).lstrip()
        if suffix == ".json" and text_start.startswith(("[", "{")):
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, list) and data and isinstance(data[0], dict):
                return list(data[0]), data[0]
            if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
                return list(data), {k: v[0] for k, v in data.items() if v}
            raise UserError("a .json data file must hold a list of records or a mapping of columns",
                            field=where, fix="write one JSON object per record, or use .jsonl")
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}: first record is not valid JSON ({e})", field=where,
                                        fix="write one JSON object per line") from None
                    if not isinstance(record, dict):
                        raise UserError(f"{path}: records must be JSON objects", field=where,
                                        fix="write one JSON object per line")
                    return list(record), record
        raise UserError(f"{path} is empty", field=where, fix=f"point {where} at a file with records")
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            first = next(reader, None)
            return list(reader.fieldnames or []), dict(first or {})
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # light (no torch); present with `datasets`

        return list(pq.read_schema(path).names), {}
    raise UserError(f"unsupported data file type '{suffix}'", field=where, fix=f"use one of {', '.join(FILE_FORMATS)}")


# -- data formats ---------------------------------------------------------------------------------

SAFERLHF_COLUMNS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                    "better_response_id", "safer_response_id")
SAFETY_LABELS = ("is_chosen_safe", "is_rejected_safe")
_TRUE, _FALSE = {"true", "1", "yes", "safe"}, {"false", "0", "no", "unsafe"}


def as_bool(value: Any) -> bool | None:
    """A safety label as a bool: a bool, 0/1, or 'true'/'false' (a CSV file's text); None if it is none of them."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return None


def _response_id(value: Any) -> int | None:
    """0 or 1 (an int, a whole float or its text), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    return None


def _format_mappings(columns: dict[str, str], fmt: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """``data.columns`` split into the renames applied before the format (to the layout's own column names)
    and after it (to the stage's names, e.g. {completion: chosen} for sft on the chosen responses)."""
    if fmt is None:
        return {}, dict(columns)
    before = {ours: theirs for ours, theirs in columns.items() if ours in SAFERLHF_COLUMNS}
    return before, {ours: theirs for ours, theirs in columns.items() if ours not in before}


def _format_needs(prefer: str) -> list[str]:
    return [c for c in SAFERLHF_COLUMNS if not c.endswith("_response_id")] + [f"{prefer}_response_id"]


def _check_mapping(mapping: dict[str, str], columns: list[str]) -> None:
    for ours, theirs in mapping.items():
        if theirs not in columns:
            raise UserError(f"column mapping {ours}: {theirs} names a column the data does not have"
                            f"{did_you_mean(theirs, columns)}; it has: {', '.join(columns)}",
                            field=f"data.columns.{ours}", fix="map to one of the data's columns")


def _renamed(names: list[str], mapping: dict[str, str]) -> list[str]:
    """Column names after ``_rename``."""
    back = {theirs: ours for ours, theirs in mapping.items()}
    out = [back.get(c, c) for c in names if c not in mapping or c in mapping.values()]
    return list(dict.fromkeys(out))


def _format_columns(names: list[str], fmt: str, prefer: str, source: str, where: str) -> list[str]:
    """The columns a source has once the format is applied; a missing layout column is refused."""
    for needed in _format_needs(prefer):
        if needed not in names:
            raise UserError(f"{source} needs the column '{needed}' for format: {fmt}; it has: {', '.join(names)}",
                            field=where,
                            fix=f"map it with data.columns (e.g. `columns: {{{needed}: <your column>}}`)"
                                + (f", or use prefer: {'better' if prefer == 'safer' else 'safer'}"
                                   if needed.endswith("_response_id") else "")
                                + "; format: null reads prompt/chosen/rejected as they are")
    return [c for c in names if c not in ("response_0", "response_1")] + ["chosen", "rejected", *SAFETY_LABELS]


def _format_record(record: dict, prefer: str, source: str, where: str, row: int) -> dict:
    """One SafeRLHF record's chosen, rejected and their safety labels."""
    key = f"{prefer}_response_id"
    k = _response_id(record[key])
    if k is None:
        raise UserError(f"{source}, row {row}: {key} is {record[key]!r}; format: saferlhf needs 0 or 1", field=where,
                        fix="fix or drop that row (0: response_0 is preferred, 1: response_1)")
    labels = {}
    for name, i in zip(SAFETY_LABELS, (k, 1 - k)):
        value = as_bool(record[f"is_response_{i}_safe"])
        if value is None:
            raise UserError(f"{source}, row {row}: is_response_{i}_safe is {record[f'is_response_{i}_safe']!r}; "
                            "format: saferlhf needs a bool (true/false or 1/0)", field=where,
                            fix="fix or drop that row")
        labels[name] = value
    return {"chosen": record[f"response_{k}"], "rejected": record[f"response_{1 - k}"], **labels}


def _apply_format(dataset, fmt: str | None, prefer: str, columns: dict[str, str], source: str, where: str):
    """A loaded dataset in the stage's columns: the renames before the format, the format, the renames after."""
    if fmt is None:
        return _rename(dataset, columns)
    before, after = _format_mappings(columns, fmt)
    _check_mapping(before, dataset.column_names)
    dataset = _rename(dataset, before)
    _format_columns(dataset.column_names, fmt, prefer, source, where)
    dataset = dataset.map(lambda record, i: _format_record(record, prefer, source, where, i), with_indices=True,
                          remove_columns=["response_0", "response_1"], desc=f"Reading {source} as {fmt}")
    return _rename(dataset, after)


def _check_columns(columns: list[str], mapping: dict[str, str], stage: Stage, where: str, first: dict,
                   required: dict[str, str] | None = None) -> None:
    """``required`` maps extra needed columns to the plugin that needs them."""
    _check_mapping(mapping, columns)
    renamed = {ours for ours in mapping} | {c for c in columns if c not in mapping.values()}
    kind = stage
    stage_columns = kind.columns
    if kind.alternative and set(kind.alternative) <= renamed:  # e.g. sft: a `messages` column instead
        stage_columns = kind.alternative
    needs = {name: f"the {stage.name} stage" for name in stage_columns}
    needs.update({name: f"plugin '{plugin}'" for name, plugin in (required or {}).items()})
    for needed, who in needs.items():
        if needed in renamed:
            continue
        if needed == "prompt" and isinstance(first.get(mapping.get("chosen", "chosen")), list):
            continue  # conversational pairs may carry the prompt inside chosen/rejected
        alternative = (f" (or {', '.join(repr(c) for c in kind.alternative)} instead)"
                       if kind.alternative and needed in kind.columns else "")
        raise UserError(
            f"{who} needs a '{needed}' column{alternative}; {where} has: {', '.join(columns)}",
            field=f"data.columns.{needed}",
            fix=f"map it, e.g. `columns: {{{needed}: <your column>}}`",
        )


def _check_formatted(names: list[str], first: dict, columns: dict, fmt: str | None, prefer: str, stage: Stage,
                     source: str, where: str, required: dict[str, str] | None) -> None:
    """Check the columns a source will have once the format and the renames are applied."""
    if fmt is not None:
        before, after = _format_mappings(columns, fmt)
        _check_mapping(before, names)
        names = _format_columns(_renamed(names, before), fmt, prefer, source, where)  # the layout needs a prompt
        first, columns = {}, after
    try:
        _check_columns(names, columns, stage, source, first, required)
    except UserError as e:
        if fmt is None and {"response_0", "response_1"} <= set(names) and "chosen" not in names:
            e.fix = (f"{e.fix}; or, for pairs in PKU-SafeRLHF's layout (response_0, response_1, ...), set "
                     "data.format: saferlhf")
            e.args = (e.render(),)
        raise


def check_source(source: str, *, columns: dict, options: dict, stage: Stage, where: str,
                 required: dict[str, str] | None = None, format: str | None = None,  # noqa: A002 - the recipe key
                 prefer: str = "safer") -> None:
    """Validate a data source without loading it. ``required``: extra column -> plugin needing it;
    ``format``/``prefer``: the recipe's data.format and data.prefer."""
    if format is None and prefer != "safer":
        raise UserError(f"prefer: {prefer} only applies to data read with a format", field="data.prefer",
                        fix="set data.format: saferlhf, or remove data.prefer")
    kind = source_kind(source)
    if kind == "builtin":
        name = source.split(":", 1)[1]
        gen = BUILTIN_DATASETS.get(name)
        if gen is None:
            raise UserError(f"unknown built-in dataset '{name}'{did_you_mean(name, BUILTIN_DATASETS)}",
                            field=where, fix=f"built-in datasets: {', '.join(BUILTIN_DATASETS)}")
        opts = parse_options(gen.options, options, where="data.options", owner=f"built-in dataset '{name}'")
        _check_formatted(gen.columns(opts), {"chosen": [] if getattr(opts, "conversational", True) else ""}, columns,
                         format, prefer, stage, source, where, required)
    elif kind == "file":
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"data file '{source}' does not exist", field=where,
                            fix="check the path (relative paths are from the directory you run posttrain in)")
        if path.suffix.lower() not in FILE_FORMATS:
            raise UserError(f"unsupported data file type '{path.suffix}'", field=where,
                            fix=f"use one of {', '.join(FILE_FORMATS)}")
        names, first = _peek_columns(path, where)
        _check_formatted(names, first, columns, format, prefer, stage, source, where, required)
    if kind != "builtin" and options:
        raise UserError("data.options only applies to built-in datasets", field="data.options",
                        fix="remove data.options")


def _load_one(source: str, split: str | None, options: dict, where: str):
    import datasets

    if is_ref(source):  # the dataset an earlier stage of the pipeline wrote
        source = dataset_path(source)
    kind = source_kind(source)
    if kind == "builtin":
        gen = BUILTIN_DATASETS[source.split(":", 1)[1]]
        opts = parse_options(gen.options, options, where="data.options", owner=source)
        return datasets.Dataset.from_list(gen.fn(opts))
    if kind == "file":
        path = Path(source).expanduser()
        return datasets.load_dataset(FILE_FORMATS[path.suffix.lower()], data_files=str(path), split="train")
    try:
        return datasets.load_dataset(source, split=split or "train")
    except Exception as e:  # offline, private, misspelt, no such split...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"cannot load dataset '{source}' (split {split or 'train'}): {type(e).__name__}: {first_line}",
                        field=where, fix="check the id/folder and the split, or point at a local data file") from None


def _rename(dataset, mapping: dict[str, str]):
    if not mapping:
        return dataset
    clashes = [ours for ours, theirs in mapping.items() if ours in dataset.column_names and ours != theirs]
    if clashes:
        dataset = dataset.remove_columns(clashes)
    return dataset.rename_columns({theirs: ours for ours, theirs in mapping.items() if ours != theirs})


def load_splits(recipe, required: dict[str, str] | None = None) -> tuple[Any, Any]:
    """The training and held-out datasets of a recipe, with columns renamed and checked."""
    data = recipe.data
    fmt, prefer = data.format, data.prefer
    train = _apply_format(_load_one(data.source, data.split, data.options, "data.source"), fmt, prefer, data.columns,
                          data.source, "data.source")
    ev = data.eval
    if ev.source or ev.split:
        where = "data.eval.source" if ev.source else "data.eval.split"
        held = _load_one(ev.source or data.source, ev.split, data.options if not ev.source else {}, where)
        held = _apply_format(held, fmt, prefer, data.columns, ev.source or data.source, where)
    elif ev.fraction > 0:
        parts = train.train_test_split(test_size=ev.fraction, seed=recipe.seed)
        train, held = parts["train"], parts["test"]
    else:
        held = None
    for name, dataset in (("data.source", train), ("data.eval", held)):
        if dataset is not None:
            first = dataset[0] if len(dataset) else {}
            _check_columns(dataset.column_names, {}, recipe.kind, name, first, required)
    if data.max_examples is not None:
        train = train.select(range(min(data.max_examples, len(train))))
    if held is not None and ev.max_examples is not None:
        held = held.select(range(min(ev.max_examples, len(held))))
    return train, held
