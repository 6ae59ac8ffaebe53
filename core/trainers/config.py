"""A run's TRL config: the hardware's defaults, the stage's, the recipe's and the plugins' values, the
run's precision flags, and the DeepSpeed config handed to TRL."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..models import Precision
from ..process import world_size
from ..validate import Plan
from .integrations import tracker_environment


def platform_defaults(chosen: dict) -> dict:
    """TRL config values that suit the hardware, for the keys the recipe (``chosen``) leaves unset.

    On a GPU, activation (gradient) checkpointing is on, as in TRL: it trades about a third more
    compute per step for activations that no longer grow with the number of layers. Turn it off
    (``training.activation_checkpointing: false``) when the batch fits without it, for speed.
    On a CPU it is off (memory is rarely the limit there, time is).
    """
    import torch

    defaults = {"report_to": "none", "logging_steps": 10, "save_strategy": "steps"}
    checkpointing_set = "gradient_checkpointing" in chosen or "activation_checkpointing" in chosen
    if not torch.cuda.is_available():
        defaults["use_cpu"] = True  # TRL's bf16 autocast on a CPU works only with use_cpu
        if not checkpointing_set:
            defaults["activation_checkpointing"] = False
        if world_size() > 1:  # CPU processes (torchrun, accelerate, DeepSpeed)
            defaults["ddp_backend"] = "gloo"
    elif not checkpointing_set:
        defaults["activation_checkpointing"] = True
    return defaults


def trl_values(plan: Plan, precision: Precision, stage_defaults: dict | None = None) -> dict:
    """The TRL config values of a run: hardware defaults, then the stage's own, then the recipe's
    and the plugins' (``plan.trl_config``), and the autocast flags of the run's precision."""
    values = {**platform_defaults(plan.trl_config), **(stage_defaults or {}), **plan.trl_config, **precision.trl_flags}
    if values.get("deepspeed") is not None:
        values["deepspeed"] = engine_config(values["deepspeed"])
    return values


def engine_config(value) -> dict:
    """The DeepSpeed config a run hands to TRL (a copy; the recipe's file is not changed). Under ZeRO-3 each
    process holds a shard of every weight, so the final model is gathered from the shards when it is saved
    (DeepSpeed's ``stage3_gather_16bit_weights_on_model_save``, on unless the config says otherwise): ``final/``
    is then a Hugging Face model in the engine's dtype, as a one-process run writes it."""
    import copy

    from ..validate import deepspeed_config

    config = copy.deepcopy(deepspeed_config(value))
    zero = config.get("zero_optimization") or {}
    if zero.get("stage") == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
        config["zero_optimization"] = zero
    return config


def build_config(config_cls, plan: Plan, run_dir: Path, precision: Precision, stage_defaults: dict | None = None):
    """The stage's TRL config; TRL's own refusals become user errors (before any model is loaded)."""
    import torch

    if plan.trl_config.get("use_liger_kernel") and not torch.cuda.is_available():
        raise UserError("Liger's kernels are Triton GPU kernels: use_liger_kernel needs a CUDA GPU",
                        field="training.use_liger_kernel", fix="remove it on a machine without a GPU")
    values = trl_values(plan, precision, stage_defaults)
    tracker_environment(values.get("report_to"), run_dir)
    try:
        return config_cls(output_dir=str(run_dir), seed=plan.recipe.seed, **values)
    except ValueError as e:
        raise UserError(f"TRL refuses these settings: {e}", field="training",
                        fix=f"change the training values it names ({config_cls.__name__}; see docs/recipes.md)") from None
