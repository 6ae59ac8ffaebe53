"""Moving the reference model towards the policy: what the reference-update plugins share.

- **Full fine-tuning**: the reference is a separate frozen copy (``trainer.ref_model``); it moves
  by π_ref ← η·π + (1 − η)·π_ref (TRL's ``SyncRefModelCallback.sync_target_model``, which also
  gathers ZeRO-3 shards).
- **LoRA**: the reference is a second adapter, ``ref``, on the same base (TRL's DPO and GRPO
  trainers use an adapter of that name as the reference whenever it exists; without it the
  reference is the adapter-disabled base). It is created as a frozen copy of the policy's
  adapter, and moves factor by factor: A_ref ← ηA + (1 − η)A_ref, B_ref ← ηB + (1 − η)B_ref. This
  is exact at η = 1 (the reference becomes the policy) and η = 0; in between it approximates the
  EMA of the update B·A to second order in how far the factors moved. No second copy of the
  base model is held.
"""

from __future__ import annotations

REF_ADAPTER = "ref"


def _peft_model(model):
    from accelerate.utils import is_peft_model

    while hasattr(model, "module") and not is_peft_model(model):  # DDP / DeepSpeed wrappers
        model = model.module
    return model if is_peft_model(model) else None


def adapter_pairs(model):
    """(policy parameter, reference parameter) for every LoRA weight of the 'default' adapter."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        if ".default." in name:
            ref = params.get(name.replace(".default.", f".{REF_ADAPTER}."))
            if ref is not None:
                yield param, ref


def add_reference_adapter(model) -> bool:
    """For a PEFT policy without one, add the 'ref' adapter as a frozen copy of 'default' (True if added)."""
    model = _peft_model(model)
    if model is None or REF_ADAPTER in model.peft_config:
        return False
    model.add_adapter(REF_ADAPTER, model.peft_config["default"])
    model.set_adapter("default")
    pairs = list(adapter_pairs(model))
    with gathered([p for pair in pairs for p in pair]):
        for policy, ref in pairs:
            ref.data.copy_(policy.data)
    for _, ref in pairs:
        ref.requires_grad_(False)
    return True


def move_reference(trainer, eta: float) -> None:
    """π_ref ← η·π + (1 − η)·π_ref for the trainer's reference, whichever form it has."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.ref_model is not None:
        from trl.trainer.callbacks import SyncRefModelCallback

        SyncRefModelCallback.sync_target_model(model, trainer.ref_model, eta)
        return
    peft = _peft_model(model)
    if peft is None:
        raise RuntimeError("the trainer has neither a reference model nor a LoRA policy")
    if add_reference_adapter(peft) and eta == 1.0:
        return  # a fresh copy is already the policy
    pairs = list(adapter_pairs(peft))
    with gathered([p for pair in pairs for p in pair]):
        for policy, ref in pairs:
            ref.data.mul_(1 - eta).add_(policy.data.to(ref.dtype), alpha=eta)


def gathered(params):
    """Whole parameters for the time of the block, also under DeepSpeed ZeRO-3 (where each process holds a
    shard): the values every process computes there are partitioned again on leaving it (rank 0's kept)."""
    import contextlib

    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
