"""Data format ``openai_preference``: OpenAI's preference fine-tuning JSONL (``input.messages``,
``preferred_output`` and ``non_preferred_output``, each a list of assistant messages) read as chat pairs:
prompt = ``input.messages``, chosen = ``preferred_output``, rejected = ``non_preferred_output``. Detected from
those three columns.
"""

from __future__ import annotations

from posttrain import Plugin, UserError, hookimpl

LAYOUT = ("input", "preferred_output", "non_preferred_output")


class OpenAIPreference(Plugin):
    name = "openai_preference"
    description = "data format: OpenAI preference fine-tuning JSONL (input.messages, preferred/non_preferred_output)"
    layout = LAYOUT

    @hookimpl
    def posttrain_format_detect(self, columns, record):
        return set(LAYOUT) <= set(columns)

    @hookimpl
    def posttrain_format_columns(self, columns):
        missing = [c for c in LAYOUT if c not in columns]
        if missing:
            raise UserError(f"format openai_preference needs the column '{missing[0]}'; the data has: "
                            f"{', '.join(columns)}", field="data.format", fix="map it with data.columns")
        return [c for c in columns if c not in LAYOUT] + ["prompt", "chosen", "rejected"]

    @hookimpl
    def posttrain_format_record(self, record, row):
        source = record.get("input")
        messages = source.get("messages") if isinstance(source, dict) else None
        if not isinstance(messages, list) or not messages:
            raise UserError(f"row {row}: input has no messages list", field=f"data (row {row}, input)",
                            fix="each record's input is {\"messages\": [...]}: fix or drop that row")
        out = {k: v for k, v in record.items() if k not in LAYOUT}
        for ours, theirs in (("chosen", "preferred_output"), ("rejected", "non_preferred_output")):
            value = record.get(theirs)
            if isinstance(value, dict):
                value = [value]
            if not isinstance(value, list) or not value:
                raise UserError(f"row {row}: {theirs} is not a list of messages", field=f"data (row {row}, {theirs})",
                                fix="fix or drop that row")
            out[ours] = value
        if isinstance(source, dict) and source.get("tools"):
            out["tools"] = source["tools"]
        return {**out, "prompt": messages}
