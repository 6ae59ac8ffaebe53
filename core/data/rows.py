"""The checks every row of a source gets (:class:`RowChecker`), each refusing the first bad row by its number and
field: the columns the stage and the plugins need present and not empty, a text column either text or
conversations throughout, conversations well formed, a column of one kind of value; and what follows from them:
scalars of several kinds read as text (:func:`as_text`), pairs whose two responses are the same counted
(:func:`check_pairs_differ` refuses a source where that is every pair)."""

from __future__ import annotations

import json

from ..errors import UserError
from ..stage import Stage
from .records import TEXT_COLUMNS, _kind


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
