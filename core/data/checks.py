"""Validating data without loading a model (``posttrain validate``, before any heavy library): one source
(:func:`check_source`: its kind, split and subset, its columns and, for a local source, every row of its split
or slice read as the stage's and checked, the first bad row refused by number and field), and a list of sources
(:func:`check_mix`: each on its own, errors naming ``data.source[i]``, then one layout and one kind of value per
column across them)."""

from __future__ import annotations

from pathlib import Path

from ..builtin import BUILTIN_DATASETS
from ..errors import UserError, did_you_mean
from ..plugin import parse_options
from ..stage import Stage
from ..stage_refs import is_ref
from .columns import _checked_columns
from .files import FILE_FORMATS, folder_splits, read_records, source_columns
from .formats import detect_format, format_plugin
from .keys import _key_field, _split_field
from .records import PromptForm, Reader
from .rows import SCALARS, RowChecker, check_pairs_differ
from .sources import (Source, SplitSlice, _hub_split_name, _in_slice, _split_for, parse_split, source_kind,
                      training_sources)


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


def _check_source(source: str, *, columns: dict, options: dict, stage: Stage, where: str,
                  required: dict[str, str] | None, format: str | None,  # noqa: A002 - the recipe key
                  format_options: dict | None, split: str | None, plugins, form: PromptForm | None,
                  subset: str | None) -> tuple[list[str], tuple | None]:
    """check_source's notes, and what it found of a local or built-in source's rows, for a mix's checks across
    its sources: (its layout, its RowChecker or None for a built-in one); None for a hub dataset."""
    kind = source_kind(source)
    fmt = format_plugin(format, format_options, _key_field(where, "format"))
    if subset is not None and kind != "dataset":
        raise UserError(f"subset: {subset} names a configuration of a hub dataset, and '{source}' is a local source",
                        field=_key_field(where, "subset"), fix="remove subset (it applies to hub datasets and data "
                                                               "folders whose README.md defines configurations)")
    part = parse_split(split, where) if kind != "dataset" else None
    split = part.name if part is not None else split
    if kind == "builtin":
        return [], (_check_builtin(source, columns, options, stage, where, required, fmt, split, form), None)
    if kind == "dataset":
        _check_dataset(source, options, where, split, subset)
        return [], None  # a hub dataset or a folder of data files: read when the run loads it
    return _check_local(source, kind, columns, options, stage, where, required, fmt, split, part, plugins, form)


def _check_builtin(source: str, columns: dict, options: dict, stage: Stage, where: str, required, fmt,
                   split: str | None, form: PromptForm | None) -> tuple:
    """A built-in dataset: its name, its one split, its options; the layout its columns make."""
    name = source.split(":", 1)[1]
    gen = BUILTIN_DATASETS.get(name)
    if gen is None:
        raise UserError(f"unknown built-in dataset '{name}'{did_you_mean(name, BUILTIN_DATASETS)}",
                        field=where, fix=f"built-in datasets: {', '.join(BUILTIN_DATASETS)}")
    _split_for(source, split, where)
    opts = parse_options(gen.options, options, where=_key_field(where, "options"),
                         owner=f"built-in dataset '{name}'")
    names = gen.columns(opts)
    return _checked_columns(Reader(stage, columns, fmt, where, form, builtin=True), names, stage, source,
                            required, fmt)


def _check_dataset(source: str, options: dict, where: str, split: str | None, subset: str | None) -> None:
    """A hub dataset or a local folder of data files: no options; a folder's split among those its files name."""
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


def _check_local(source: str, kind: str, columns: dict, options: dict, stage: Stage, where: str, required, fmt,
                 split: str | None, part: SplitSlice | None, plugins, form: PromptForm | None
                 ) -> tuple[list[str], tuple]:
    """A local file or saved dataset: it exists and is read, its format detected when none is named, every row of
    its split (or slice) read as the stage's and checked."""
    notes: list[str] = []
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
