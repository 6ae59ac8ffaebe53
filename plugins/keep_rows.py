"""Keep only the dataset rows whose column holds one of the given values (both splits, any stage).

A ``posttrain_transform_dataset`` plugin: for example, keep the GSM8K and MATH prompts of a mixed
RLVR dataset, ``keep_rows: {column: dataset, values: [gsm8k, MATH]}``. A split left empty is
refused, naming this plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain import Plugin, Transformed, UserError, hookimpl


class KeepRows(Plugin):
    name = "keep_rows"
    description = "keeps the rows whose column holds one of the given values"

    @dataclass
    class Options:
        column: str = field(metadata={"help": "The column to look at."})
        values: list[Any] = field(metadata={"help": "Values to keep."})

    @hookimpl
    def posttrain_transform_dataset(self, dataset):
        column, values = self.options.column, self.options.values
        if column not in dataset.column_names:
            raise UserError(f"the data has no column '{column}'; it has: {', '.join(dataset.column_names)}",
                            field="plugins.keep_rows.column", fix="name one of the data's columns")
        keep = set(values)
        kept = dataset.filter(lambda value: value in keep, input_columns=[column])
        return Transformed(kept, reason=f"{column} not in {sorted(map(str, keep))}")
