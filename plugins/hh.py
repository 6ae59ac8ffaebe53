"""Data format ``hh``: Anthropic's HH-RLHF pairs, each a whole dialogue as text
(``"\\n\\nHuman: ... \\n\\nAssistant: ..."``) in ``chosen`` and ``rejected``, read as chat pairs: the turns
the two dialogues share are the prompt (user and assistant messages), each dialogue's last assistant turn
its response. Detected when ``chosen`` starts with ``\\n\\nHuman:`` and the source has no ``prompt`` column.
"""

from __future__ import annotations

import re

from posttrain import Plugin, UserError, hookimpl

_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def turns(text: str) -> list[dict]:
    """A dialogue's turns as chat messages."""
    parts = _TURN.split(text)
    if parts and parts[0].strip() == "":
        parts = parts[1:]
    if len(parts) < 2 or len(parts) % 2:
        return []
    return [{"role": _ROLE[parts[i]], "content": parts[i + 1].strip()} for i in range(0, len(parts), 2)]


class HH(Plugin):
    name = "hh"
    description = "data format: HH-RLHF dialogues as text ('\\n\\nHuman: ... \\n\\nAssistant: ...') as chat pairs"
    layout = ("chosen", "rejected")

    @hookimpl
    def posttrain_format_detect(self, columns, record):
        # a source with its own prompt column was split already: its responses are read as they are (with a
        # prompt they repeat removed)
        return "chosen" in columns and "prompt" not in columns and isinstance(record.get("chosen"), str) and \
            record["chosen"].lstrip(" ").startswith("\n\nHuman:")

    @hookimpl
    def posttrain_format_columns(self, columns):
        for needed in self.layout:
            if needed not in columns:
                raise UserError(f"format hh needs a '{needed}' column; the data has: {', '.join(columns)}",
                                field="data.format", fix=f"map it with data.columns (e.g. `{needed}: <column>`)")
        return [*columns, "prompt"] if "prompt" not in columns else list(columns)

    @hookimpl
    def posttrain_format_record(self, record, row):
        chosen, rejected = turns(str(record.get("chosen") or "")), turns(str(record.get("rejected") or ""))
        for name, dialogue in (("chosen", chosen), ("rejected", rejected)):
            if not dialogue or dialogue[-1]["role"] != "assistant":
                raise UserError(f"row {row}: {name} is not an HH dialogue ending on an Assistant turn",
                                field=f"data (row {row}, {name})",
                                fix="fix or drop that row; each dialogue is '\\n\\nHuman: ...\\n\\nAssistant: ...'")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt = chosen[:shared]
        if not prompt or prompt[-1]["role"] != "user":
            raise UserError(f"row {row}: the chosen and rejected dialogues share no opening ending on a Human turn",
                            field=f"data (row {row}, chosen)", fix="fix or drop that row")
        return {**record, "prompt": prompt, "chosen": chosen[shared:], "rejected": rejected[shared:]}
