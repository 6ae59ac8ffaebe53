"""Data format ``saferlhf``: PKU-SafeRLHF's preference pairs read as prompt/chosen/rejected.

A record has ``prompt``, ``response_0``, ``response_1``, ``is_response_0_safe``, ``is_response_1_safe``,
``better_response_id`` and ``safer_response_id``. The chosen response is the one the label ``prefer``
names (``safer``: ``safer_response_id``; ``better``: ``better_response_id``), the other is rejected; the
per-response safety labels become ``is_chosen_safe`` and ``is_rejected_safe`` (what ``filter_dual_unsafe``
and ``filter_dual_safe`` read). PKU-SafeRLHF's text (a question, two answers) is read as a conversation: the
question a user turn, each answer the assistant's reply, so the model's chat template marks where the answer
starts; a source whose prompt and responses are already messages is kept as it is. The other columns are kept; ``response_0``/``response_1`` are dropped
(they are chosen and rejected). A recipe names it, ``data: {format: saferlhf, prefer: better}``; it is
not detected, because which label picks the chosen response is a choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain import Plugin, UserError, hookimpl
from posttrain.data import as_bool

LAYOUT = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe", "better_response_id",
          "safer_response_id")
SAFETY_LABELS = ("is_chosen_safe", "is_rejected_safe")


def _response_id(value: Any) -> int | None:
    """0 or 1 (an int, a whole float or its text), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    return None


class SaferLHF(Plugin):
    name = "saferlhf"
    description = "data format: PKU-SafeRLHF pairs (response_0/1, safety labels) as prompt/chosen/rejected"
    layout = LAYOUT  # the source columns it reads (data.columns maps to them before it reads)

    @dataclass
    class Options:
        prefer: Literal["safer", "better"] = field(default="safer", metadata={
            "help": "The label that picks the chosen response: safer_response_id or better_response_id."})

    def needs(self) -> list[str]:
        return [c for c in LAYOUT if not c.endswith("_response_id")] + [f"{self.options.prefer}_response_id"]

    @hookimpl
    def posttrain_format_columns(self, columns):
        for needed in self.needs():
            if needed not in columns:
                other = "better" if self.options.prefer == "safer" else "safer"
                raise UserError(f"format saferlhf needs the column '{needed}'; the data has: {', '.join(columns)}",
                                field="data.format",
                                fix=f"map it with data.columns (e.g. `columns: {{{needed}: <your column>}}`)"
                                    + (f", or use prefer: {other}" if needed.endswith("_response_id") else "")
                                    + "; format: null reads prompt/chosen/rejected as they are")
        return [c for c in columns if c not in ("response_0", "response_1")] + ["chosen", "rejected", *SAFETY_LABELS]

    @hookimpl
    def posttrain_format_record(self, record, row):
        key = f"{self.options.prefer}_response_id"
        k = _response_id(record.get(key))
        if k is None:
            raise UserError(f"row {row}: {key} is {record.get(key)!r}; format saferlhf needs 0 or 1",
                            field=f"data (row {row}, {key})",
                            fix="fix or drop that row (0: response_0 is preferred, 1: response_1)")
        labels = {}
        for name, i in zip(SAFETY_LABELS, (k, 1 - k)):
            value = as_bool(record.get(f"is_response_{i}_safe"))
            if value is None:
                raise UserError(f"row {row}: is_response_{i}_safe is {record.get(f'is_response_{i}_safe')!r}; "
                                "format saferlhf needs a bool (true/false or 1/0)",
                                field=f"data (row {row}, is_response_{i}_safe)", fix="fix or drop that row")
            labels[name] = value
        kept = {c: v for c, v in record.items() if c not in ("response_0", "response_1")}
        chosen, rejected = record[f"response_{k}"], record[f"response_{1 - k}"]
        if all(isinstance(v, str) for v in (record.get("prompt"), chosen, rejected)):
            # PKU-SafeRLHF's text: a question and two answers, read as one user turn and the assistant's reply, so
            # the model's chat template separates them (as text they would be trained on glued together)
            kept["prompt"] = [{"role": "user", "content": record["prompt"]}]
            chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
        return {**kept, "chosen": chosen, "rejected": rejected, **labels}
