"""A stage's sources and their records as they are (before any format or renames): what a source is
(:func:`source_kind`: a built-in generator, a local file, a saved dataset, a hub dataset or data folder), the
sources a recipe's ``data`` section names (:class:`Source`: ``data.source``, each entry of a list of sources,
``data.eval``), a split and its slice (``train[:5%]``, ``train[10:20]``: :class:`SplitSlice`, read as ``datasets``
reads it), the rows a mix entry's ``fraction`` or ``count`` uses (:func:`sample_rows`), and one source's records
(:func:`_source_rows`)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..builtin import BUILTIN_DATASETS
from ..errors import UserError
from ..plugin import parse_options
from ..stage_refs import dataset_path, is_ref
from .files import FILE_FORMATS, file_splits, is_saved_dataset, read_records, source_columns
from .formats import format_options
from .keys import _key_field, _split_field


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


def _hub_split_name(split: str | None) -> str:
    """The first split a split string for ``load_dataset`` names (``train`` of ``train[:5%]+test``)."""
    return re.split(r"[\[+(]", split or "train", maxsplit=1)[0].strip()


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


# -- a recipe's sources -------------------------------------------------------------------------------------


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


# -- one source's records -----------------------------------------------------------------------------------


def source_records(source: str, split: str | None, options: dict, where: str) -> tuple[list[str], list[dict]]:
    """A source's column names and records, as they are (before any format or renames); a slice of a local
    split (``train[:5%]``) applied."""
    names, records, _ = _source_rows(source, split, options, where)
    return names, records


def _source_rows(source: str, split: str | None, options: dict, where: str,
                 subset: str | None = None) -> tuple[list[str], list[dict], int]:
    """source_records, and the number of the first record's row in the source (1, or where its slice starts).
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
