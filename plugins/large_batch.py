"""Large batch: many prompts per policy update, said as one number. The second of the three PPO
factors the study *Is DPO Superior to PPO for LLM Alignment?* found decisive.

``prompts_per_update`` prompts, each with ``num_generations`` completions, make one generation
batch and one optimizer step:

    completions per update   = prompts_per_update × num_generations
    gradient_accumulation    = completions per update / (per_device_train_batch_size × processes)
    steps_per_generation     = gradient_accumulation     (one generation batch per update)

The plugin sets ``gradient_accumulation_steps`` and ``steps_per_generation`` (and
``per_device_train_batch_size`` when ``completions_per_device`` is given: the memory knob), and
refuses numbers that do not divide, before anything is loaded. ``num_generations`` and the
per-device batch are read from the recipe's ``training`` section (TRL's defaults otherwise);
processes from ``WORLD_SIZE`` (set by torchrun / accelerate launch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import Plugin, UserError, hookimpl


class LargeBatch(Plugin):
    name = "large_batch"
    description = "sets the TRL batch settings so that each policy update sees prompts_per_update prompts (online)"
    stages = ("online",)

    @dataclass
    class Options:
        prompts_per_update: int = field(default=64, metadata={"help": "Prompts per optimizer step (each with "
                                                                       "num_generations completions)."})
        completions_per_device: int | None = field(default=None, metadata={
            "help": "Completions per device per forward/backward pass (per_device_train_batch_size); null: the "
                    "recipe's training value, else TRL's default."})

        def validate(self):
            if self.prompts_per_update < 1:
                raise ValueError(f"prompts_per_update must be >= 1, got {self.prompts_per_update}")
            if self.completions_per_device is not None and self.completions_per_device < 1:
                raise ValueError(f"completions_per_device must be >= 1, got {self.completions_per_device}")

    @hookimpl
    def posttrain_trl_config(self, stage, recipe):
        from posttrain.process import world_size
        from posttrain.stages import get_stage
        from posttrain.trl_fields import config_defaults

        training, defaults = recipe.get("training") or {}, config_defaults(get_stage(stage).config)
        group = training.get("num_generations", defaults["num_generations"])
        per_device = self.options.completions_per_device or training.get(
            "per_device_train_batch_size", defaults["per_device_train_batch_size"])
        processes = world_size()
        completions = self.options.prompts_per_update * group
        if completions % (per_device * processes):
            raise UserError(
                f"{self.options.prompts_per_update} prompts x {group} completions = {completions} completions per "
                f"update do not split into passes of {per_device} completions on each of {processes} process(es)",
                field="plugins.large_batch.prompts_per_update",
                fix=f"make prompts_per_update x num_generations a multiple of {per_device * processes} "
                    "(completions per device x processes), or change completions_per_device")
        accumulation = completions // (per_device * processes)
        out = {"gradient_accumulation_steps": accumulation, "steps_per_generation": accumulation}
        if self.options.completions_per_device is not None:
            out["per_device_train_batch_size"] = per_device
        return out
