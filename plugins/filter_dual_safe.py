"""Drop the preference pairs whose two responses are both safe (the DPO-vs-PPO study's fix 3).

A ``posttrain_transform_dataset`` plugin, for both splits and any stage: when safety is what a
preference run should teach, a pair of two safe responses (whose preference is about helpfulness,
or is a coin flip of the annotators) only blurs it, so it is dropped; with ``filter_dual_unsafe``
as well, only the pairs with one safe and one unsafe response remain. It reads the per-response
safety labels ``is_chosen_safe`` and ``is_rejected_safe`` (what ``data.format: saferlhf`` makes of
PKU-SafeRLHF's labels; the options name other columns), which validation requires. The run prints
how many rows it kept and dropped per split, and ``summary.json`` records them under
``data_transforms``.
"""

from __future__ import annotations

from posttrain.plugins.filter_dual_unsafe import FilterDualUnsafe


class FilterDualSafe(FilterDualUnsafe):
    """The same labels and options as ``filter_dual_unsafe``; another kind of pair is dropped."""

    name = "filter_dual_safe"
    description = "drops preference pairs whose two responses are both safe (per-response safety labels)"
    dropped = "both responses safe"

    def keep(self, chosen_safe: bool, rejected_safe: bool) -> bool:
        return not (chosen_safe and rejected_safe)
