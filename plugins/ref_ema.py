"""Reference-model EMA: π_ref ← η·π_θ + (1-η)·π_ref every k optimizer steps.

One of the three PPO factors the study *Is DPO Superior to PPO?* found decisive; the same
plugin works in the preference stage (and, later, the online stage) because it acts through the
``posttrain_update_reference`` hook.

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

Limits: the reference is not part of checkpoints, so after ``--resume`` it restarts from the
resumed policy (as with TRL's own sync).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import Plugin, hookimpl

REF_ADAPTER = "ref"


def _adapter_pairs(model):
    """(policy parameter, reference parameter) for every LoRA weight of the 'default' adapter."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        if ".default." in name:
            ref = params.get(name.replace(".default.", f".{REF_ADAPTER}."))
            if ref is not None:
                yield param, ref


class RefEMA(Plugin):
    name = "ref_ema"
    description = "moves the reference towards the policy by EMA every k steps (full fine-tuning and LoRA)"

    @dataclass
    class Options:
        eta: float = field(default=0.05, metadata={"help": "EMA rate η: 0 keeps the reference frozen, 1 copies the policy."})
        every: int = field(default=1, metadata={"help": "Update the reference every k optimizer steps."})

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
        if event != "step" or step % self.options.every:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        if trainer.ref_model is not None:
            from trl.trainer.callbacks import SyncRefModelCallback

            SyncRefModelCallback.sync_target_model(model, trainer.ref_model, self.options.eta)
            return
        eta = self.options.eta
        for policy, ref in _adapter_pairs(model):
            ref.data.mul_(1 - eta).add_(policy.data.to(ref.dtype), alpha=eta)


def add_reference_adapter(model) -> None:
    """For a PEFT policy without one, add the 'ref' adapter as a frozen copy of 'default'."""
    from accelerate.utils import is_peft_model

    while hasattr(model, "module") and not is_peft_model(model):  # DDP / DeepSpeed wrappers
        model = model.module
    if not is_peft_model(model) or REF_ADAPTER in model.peft_config:
        return
    model.add_adapter(REF_ADAPTER, model.peft_config["default"])
    model.set_adapter("default")
    for policy, ref in _adapter_pairs(model):
        ref.data.copy_(policy.data)
        ref.requires_grad_(False)
