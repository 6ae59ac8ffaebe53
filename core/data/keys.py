"""The recipe key an error about a source names: the data section's (``data.split``, ``data.columns``...) for
``data.source`` and ``data.eval.source``, or an entry's own (``data.source[1].split``) for an entry of a list of
sources."""

from __future__ import annotations


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
