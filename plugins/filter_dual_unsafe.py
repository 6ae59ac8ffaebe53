"""Drop the preference pairs whose two responses are both unsafe (the DPO-vs-PPO study's fix 3).

A ``posttrain_transform_dataset`` plugin, for both splits and any stage: a pair whose chosen and
rejected responses are both labelled unsafe teaches nothing about safety (its "chosen" response is
unsafe too), so it is dropped. It reads the per-response safety labels ``is_chosen_safe`` and
``is_rejected_safe`` (what ``data.format: saferlhf`` makes of PKU-SafeRLHF's
``is_response_0_safe``/``is_response_1_safe``; the options name other columns), which validation
requires. Labels are bools, 0/1 or their text (``true``/``false``); anything else is refused with the
row named. The run prints how many rows it kept and dropped per split, and ``summary.json`` records
them under ``data_transforms``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import Plugin, Transformed, UserError, hookimpl
from posttrain.data import as_bool


def safety_labels(plugin: Plugin, dataset) -> tuple[list[bool], list[bool]]:
    """The chosen and rejected safety labels of every row, as bools; a missing column or a label that is not
    a bool is refused, naming the plugin's option."""
    out = []
    for option in ("chosen_column", "rejected_column"):
        column = getattr(plugin.options, option)
        if column not in dataset.column_names:
            raise UserError(f"plugin '{plugin.name}' needs the safety label column '{column}'; the data has: "
                            f"{', '.join(dataset.column_names)}", field=f"plugins.{plugin.name}.{option}",
                            fix="name the column holding each response's safety label, or read PKU-SafeRLHF pairs "
                                "with data.format: saferlhf")
        labels = []
        for row, value in enumerate(dataset[column]):
            label = as_bool(value)
            if label is None:
                raise UserError(f"plugin '{plugin.name}': row {row} has {column} = {value!r}, not a safety label",
                                field=f"plugins.{plugin.name}.{option}",
                                fix="labels are true/false (or 1/0): fix or drop that row")
            labels.append(label)
        out.append(labels)
    return out[0], out[1]


class FilterDualUnsafe(Plugin):
    name = "filter_dual_unsafe"
    description = "drops preference pairs whose two responses are both unsafe (per-response safety labels)"

    @dataclass
    class Options:
        chosen_column: str = field(default="is_chosen_safe", metadata={
            "help": "The column holding the chosen response's safety label."})
        rejected_column: str = field(default="is_rejected_safe", metadata={
            "help": "The column holding the rejected response's safety label."})

    @hookimpl
    def posttrain_required_columns(self, stage):
        return [self.options.chosen_column, self.options.rejected_column]

    dropped = "both responses unsafe"  # the kind of pair this plugin drops, reported with its counts

    def keep(self, chosen_safe: bool, rejected_safe: bool) -> bool:
        """Whether a pair with these labels stays (subclasses drop other kinds of pair)."""
        return chosen_safe or rejected_safe

    @hookimpl
    def posttrain_transform_dataset(self, dataset):
        chosen, rejected = safety_labels(self, dataset)
        kept = dataset.select([i for i, (c, r) in enumerate(zip(chosen, rejected)) if self.keep(c, r)])
        return Transformed(kept, reason=self.dropped)
