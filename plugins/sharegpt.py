"""Data format ``sharegpt``: ShareGPT conversations (``conversations``, or ``messages``, a list of
``{"from": "human" | "gpt" | "system" | ..., "value": ...}``) read as chat ``messages`` (``role``/``content``:
human → user, gpt → assistant, system → system). Detected from the turns' ``from``/``value`` keys.
"""

from __future__ import annotations

from posttrain import Plugin, UserError, hookimpl

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system", "tool": "tool",
         "function_call": "assistant", "observation": "tool"}


def _column(columns) -> str | None:
    return next((c for c in ("conversations", "messages") if c in columns), None)


class ShareGPT(Plugin):
    name = "sharegpt"
    description = "data format: ShareGPT conversations ({from, value} turns) as chat messages"
    layout = ("conversations",)

    @hookimpl
    def posttrain_format_detect(self, columns, record):
        column = _column(columns)
        turns = record.get(column) if column else None
        return bool(isinstance(turns, list) and turns and isinstance(turns[0], dict) and
                    {"from", "value"} <= set(turns[0]))

    @hookimpl
    def posttrain_format_columns(self, columns):
        column = _column(columns)
        if column is None:
            raise UserError(f"format sharegpt needs a 'conversations' column; the data has: {', '.join(columns)}",
                            field="data.format", fix="map it: `columns: {conversations: <your column>}`")
        return [c for c in columns if c != column] + ["messages"]

    @hookimpl
    def posttrain_format_record(self, record, row):
        column = _column(record)
        messages = []
        for i, turn in enumerate(record.get(column) or []):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise UserError(f"row {row}: turn {i} of {column} is not a {{from, value}} turn: {turn!r}"[:300],
                                field=f"data (row {row}, {column})", fix="fix or drop that row")
            role = ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise UserError(f"row {row}: turn {i} is from {turn['from']!r}, which is not a ShareGPT role",
                                field=f"data (row {row}, {column})",
                                fix=f"use one of {', '.join(sorted(ROLES))}, or fix that row")
            messages.append({"role": role, "content": str(turn["value"])})
        return {**{k: v for k, v in record.items() if k != column}, "messages": messages}
