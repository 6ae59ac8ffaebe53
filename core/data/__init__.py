"""Where training data comes from, and how its records become the stage's: built-in generators, local files
(``.jsonl``, ``.json``, ``.csv``, ``.parquet``), folders written by ``datasets``' ``save_to_disk``, or a hub
dataset; one source or a list of them (``data.source``), each split possibly sliced (``train[:5%]``).

``check_source`` and ``check_mix`` run during validation, before any model or heavy library is loaded: a local
source is read in full, row by row, and the first bad row (missing or null fields, bytes that are not UTF-8, a
line that is not JSON, a column that mixes text and conversations, a conversation that does not end on the
assistant) is refused naming the row, the field and the fix. ``load_splits`` builds the ``datasets.Dataset``
objects for a run, reads them the same way and checks them again (a hub dataset is first seen there).

The modules, from the bottom up:

- ``keys``: the recipe key an error about a source names (``data.split``, or an entry's ``data.source[i].split``);
- ``files``: local files and saved-dataset folders, their splits, their records in order and their columns;
- ``formats``: data formats (plugins) named by ``data.format`` or detected, and their options;
- ``sources``: what a source is, the sources of a recipe's ``data`` section (:class:`Source`), splits and their
  slices (:class:`SplitSlice`), a mix entry's rows (:func:`sample_rows`), one source's records as they are;
- ``records``: reading a record as the stage's and its repairs (:class:`Reader`), the prompt form
  (:class:`PromptForm`), labels as bools (:func:`as_bool`);
- ``columns``: the stage's layout a source's columns make, and the hints when they make none;
- ``rows``: the checks every row gets (:class:`RowChecker`);
- ``checks``: validation without a model, of one source and of a list of sources;
- ``splits``: the run's training and held-out datasets, a mix read as one (:func:`read_mix`), the row counts.

Every name other modules import is importable from ``posttrain.data``.
"""

from .checks import check_mix, check_source
from .columns import check_columns
from .files import FILE_FORMATS, file_splits, folder_splits, is_saved_dataset, read_records, source_columns
from .formats import detect_format, format_options, format_plugin
from .records import RESPONSES, TEXT_COLUMNS, PromptForm, Reader, as_bool, prompt_form
from .rows import SCALARS, RowChecker, as_text, check_pairs_differ
from .sources import (Source, SplitSlice, eval_source, parse_split, sample_rows, source_kind, source_records,
                      training_sources)
from .splits import load_splits, read_mix, source_counts

__all__ = [
    "FILE_FORMATS", "RESPONSES", "SCALARS", "TEXT_COLUMNS", "PromptForm", "Reader", "RowChecker", "Source",
    "SplitSlice", "as_bool", "as_text", "check_columns", "check_mix", "check_pairs_differ", "check_source",
    "detect_format", "eval_source", "file_splits", "folder_splits", "format_options", "format_plugin",
    "is_saved_dataset", "load_splits", "parse_split", "prompt_form", "read_mix", "read_records", "sample_rows",
    "source_columns", "source_counts", "source_kind", "source_records", "training_sources",
]
