"""``stage: distillation``: on-policy distillation (Agarwal et al. 2024, GKD), on TRL's DistillationTrainer
(``posttrain.trainers.distillation``).

The student (the recipe's model) samples a completion of each prompt and is trained to match the teacher's
next-token distributions on it: with p the teacher's and q the student's distribution at a completion token
(both at ``training.temperature``) and m = β·p + (1 − β)·q, the loss per token is, with β TRL's ``beta``
(under ``training``, default 1.0),

    KL(p ‖ q)                              β = 0   (forward KL)
    β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)        0 < β < 1   (the generalised Jensen-Shannon divergence)
    KL(q ‖ p)                              β = 1   (reverse KL)

averaged over the completion tokens of the batch. Every completion is the
student's own (TRL 1.16's trainer has no mix with dataset completions). The teacher is the stage's
``teacher`` key: a folder, a hub id, ``builtin:NAME`` or ``stages.NAME`` (an earlier stage of the pipeline);
it must share the student's vocabulary. It is frozen, in the compute dtype; under ZeRO-3 it is sharded
across the processes as the student is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from ..stage import COMMON_MANAGED, COMMON_RENAMED, SETUP_HOOKS, MemoryFacts, Panel, trl_config
from .trainer_stage import TrainerStage

# The distillation stage's prompt length when the command line does not give one.
DEFAULT_PROMPT_LENGTH = 512


class DistillationStage(TrainerStage):
    name = "distillation"
    about = ("on-policy distillation: the student samples completions of the prompts and learns the teacher's "
             "token distributions on them (generalised JSD: forward KL, reverse KL or between)")
    trainer = "trl.DistillationTrainer"
    trainer_module = "distillation"
    config = trl_config("trl", "trainer/distillation_config.py", "DistillationConfig")
    layouts = (("prompt",),)
    generates = True
    managed = {
        **COMMON_MANAGED,
        "teacher_model_name_or_path": "use the stage's `teacher` key (a folder, hub id, builtin: name or "
                                      "stages.NAME)",
        "teacher_model_init_kwargs": "the teacher is loaded as the model is (model.dtype, model.trust_remote_code)",
        "teacher_model_revision": "name the teacher's revision in a folder or hub id of its own",
    }
    renamed = {
        **COMMON_RENAMED,
        "max_length": "use max_completion_length (the sampled part; prompts are limited by data.max_prompt_length)",
        "max_prompt_length": "use data.max_prompt_length (prompts cut on the left or dropped, counted)",
        "lmbda": "TRL 1.16's DistillationTrainer trains on the student's own samples only (on-policy share 1)",
        "seq_kd": "TRL 1.16's DistillationTrainer trains on the student's own samples only (no teacher-generated "
                  "sequences)",
    }
    hooks = (*SETUP_HOOKS, "posttrain_sample", "posttrain_reward")
    summary_rows = (("held-out divergence (teacher)", "heldout", "divergence"),)
    panels = (Panel("loss", "training loss (generalised JSD to the teacher)", ("loss",)),
              Panel("entropy", "student's entropy on its samples", ("entropy",)),
              Panel("heldout_divergence", "held-out divergence to the teacher", ("heldout", "divergence"),
                    "heldout"))

    @dataclass
    class Options:
        teacher: str = field(metadata={
            "help": "distillation stage: the teacher, a folder, hub id, builtin: name or stages.NAME (an earlier "
                    "stage of the pipeline); it must share the student's vocabulary."})

    def check(self, plan) -> None:
        """The teacher and the student share a vocabulary (checked here when both are local folders; TRL checks
        it again when it loads them)."""
        teacher, student = _vocab_size(plan.options.teacher), _vocab_size(plan.recipe.model.name_or_path)
        if teacher is not None and student is not None and teacher != student:
            raise UserError(f"the teacher's vocabulary has {teacher} tokens and the student's {student}: distillation "
                            "compares their distributions token by token", field="teacher",
                            fix="distil from a teacher of the student's model family (the same tokenizer)")

    def memory(self, cfg, plugins, recipe, *, prompt_length, max_positions, processes) -> MemoryFacts:
        per_device = int(cfg.get("per_device_train_batch_size") or 8)
        completion = int(cfg.get("max_completion_length") or 512)
        prompt = prompt_length if prompt_length is not None else DEFAULT_PROMPT_LENGTH
        facts = MemoryFacts(rows=per_device, seq_len=prompt + completion, scored_tokens=per_device * completion,
                            prompt_len=prompt, completion_len=completion, unit="completions",
                            generation_rows=per_device * int(cfg.get("gradient_accumulation_steps") or 1),
                            reference="copy")
        facts.notes.append("distillation: the teacher is counted as a frozen copy of the student (a larger teacher "
                           "needs proportionally more)")
        if prompt_length is None:
            facts.notes.append(f"distillation: prompts assumed {DEFAULT_PROMPT_LENGTH} tokens long; give "
                               "--prompt-length for yours")
        return facts


def _vocab_size(name_or_path: str) -> int | None:
    """``vocab_size`` of a local model folder's config.json (a multimodal model's text config's), or None."""
    import json

    from ..models import model_folder

    folder = model_folder(name_or_path)
    config = folder / "config.json" if folder is not None else None
    if config is None or not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    return (data.get("text_config") or {}).get("vocab_size") or data.get("vocab_size")


STAGE = DistillationStage()
