"""A run's datasets (:func:`load_splits`): the training data (one source, or a list of sources mixed by
:func:`read_mix`) and the held-out data (``data.eval``: a source, a split, or a fraction of the training rows), as
``datasets.Dataset`` objects, each source read as the stage's records and checked again (a hub dataset is first
seen here); what was repaired or dropped on the way (summary.json's ``data_transforms``) and each source's row
counts (``data_sources``, :func:`source_counts`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from .checks import _check_mix
from .columns import _checked_columns
from .formats import detect_format, format_options, format_plugin
from .keys import _key_field
from .records import PromptForm, Reader
from .rows import RowChecker, as_text, check_pairs_differ
from .sources import Source, _source_rows, eval_source, sample_rows, training_sources


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
