"""Which of the stage's layouts a source's columns make, once read (:func:`check_columns`): a column the stage
or a plugin needs and the data lacks is refused naming the ``columns`` key to map it with, and the fix says why
when the data holds it (a mapping moved it away, the rows are unpaired feedback for kto) or which installed data
formats would read the columns."""

from __future__ import annotations

from ..errors import UserError
from ..stage import Stage
from .keys import _key_field
from .records import Reader


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
    from ..registry import discover

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
