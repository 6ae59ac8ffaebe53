"""Iterative DPO's moving reference: at the end of each round the reference becomes the latest
policy (the DPO-vs-PPO study's iterative DPO, fix 2), so round r + 1 is regularised towards the
policy of round r instead of the starting model.

Full fine-tuning: the reference copy's weights are set to the policy's. LoRA: the reference is the
``ref`` adapter, set to a copy of the policy's adapter (TRL's DPO trainer uses an adapter of that
name as the reference), so no second copy of the base model is held. Without any reference-update
plugin an iterative stage keeps the starting model as the reference (π₀); ``ref_ema`` with ``on:
round`` moves it part of the way each round.
"""

from __future__ import annotations

from posttrain import Plugin, hookimpl
from posttrain.reference import move_reference


class RefToLatest(Plugin):
    name = "ref_to_latest"
    description = "iterative DPO: after each round the reference becomes the latest policy (full FT and LoRA)"
    stages = ("iterative",)  # it moves the reference between rounds

    @hookimpl
    def posttrain_reference_needed(self):
        return True

    @hookimpl
    def posttrain_update_reference(self, trainer, event):
        if event == "round":
            move_reference(trainer, 1.0)
