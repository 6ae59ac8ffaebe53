"""Data formats: plugins (``posttrain_format_record``) that turn a source's records into the stage's columns
(``sharegpt``, ``openai_preference``, ``hh``, ``saferlhf``...), named by ``data.format`` (:func:`format_plugin`,
with :func:`format_options`) or recognised from a source's columns and first record (:func:`detect_format`)."""

from __future__ import annotations

from ..errors import UserError


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
    from ..registry import find_plugin, hook_methods

    info = find_plugin(name)
    if "posttrain_format_record" not in hook_methods(info.cls):
        from ..registry import discover

        formats = [n for n, i in discover()[0].items() if "posttrain_format_record" in i.hooks]
        raise UserError(f"plugin '{name}' is not a data format (it does not implement posttrain_format_record)",
                        field=where, fix=f"data formats: {', '.join(formats)}")
    return info.cls(info.cls.parse_options(options or {}, where=f"{where}_options"))


def detect_format(columns: list[str], record: dict):
    """The installed data format that recognises a source (posttrain_format_detect), or None."""
    from ..registry import discover

    for name, info in discover()[0].items():
        if "posttrain_format_detect" in info.hooks:
            plugin = info.cls(info.cls.Options())
            if plugin.posttrain_format_detect(columns=list(columns), record=dict(record)):
                return plugin
    return None
