"""Reference-model EMA: π_ref ← η·π_θ + (1-η)·π_ref every k optimizer steps.

One of the three PPO factors the study *Is DPO Superior to PPO?* found decisive; the same
plugin works in the preference and online stages because it acts through the
``posttrain_update_reference`` hook, after optimizer steps, or (``on: round``) at the end of each
round of an iterative stage (iterative DPO with a reference that follows the policy by EMA).

- **Full fine-tuning**: the reference is a separate copy of the model; its weights move towards
  the policy's (TRL's ``SyncRefModelCallback.sync_target_model``, which also gathers ZeRO-3
  shards).
- **LoRA** (TRL's own reference sync refuses PEFT): the reference becomes a second adapter,
  ``ref``, on the same base model. TRL already uses an adapter of that name as the reference
  whenever it exists. When training begins, ``ref`` is a copy of the policy adapter (with a fresh
  adapter this is exactly the base model); after every k steps each of its LoRA factors moves
  towards the policy adapter's: A_ref ← ηA + (1-η)A_ref, B_ref ← ηB + (1-η)B_ref. This
  approximates the EMA of the weight update ΔW = BA: B_ref·A_ref differs from the EMA of B·A by
  a term of second order in how far the factors moved, and is exact at η = 0 (frozen) and η = 1
  (reference = policy). No second copy of the base model is held.

The moving itself is ``posttrain.reference`` (shared with ``ref_to_latest``). Limits: within a
stage the reference is not part of checkpoints, so after ``--resume`` it restarts from the
resumed policy (as with TRL's own sync); an iterative stage saves it with each round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain import Plugin, hookimpl
from posttrain.reference import add_reference_adapter, move_reference


class RefEMA(Plugin):
    name = "ref_ema"
    description = "moves the reference towards the policy by EMA every k steps (full fine-tuning and LoRA)"

    @dataclass
    class Options:
        eta: float = field(default=0.05, metadata={"help": "EMA rate η: 0 keeps the reference frozen, 1 copies the policy."})
        every: int = field(default=1, metadata={"help": "Update the reference every k optimizer steps (or rounds)."})
        on: Literal["step", "round"] = field(default="step", metadata={
            "help": "'step': after optimizer steps; 'round': at the end of each round of an iterative stage."})

        def validate(self):
            if not 0 <= self.eta <= 1:
                raise ValueError(f"eta must be in [0, 1], got {self.eta}")
            if self.every < 1:
                raise ValueError(f"every must be >= 1, got {self.every}")

    @hookimpl
    def posttrain_reference_needed(self):
        return True

    @hookimpl
    def posttrain_callbacks(self):
        from transformers import TrainerCallback

        class CreateReferenceAdapter(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                add_reference_adapter(model)

        return [CreateReferenceAdapter()]

    @hookimpl
    def posttrain_update_reference(self, trainer, event, step):
        if event != self.options.on or step % self.options.every:
            return
        move_reference(trainer, self.options.eta)
