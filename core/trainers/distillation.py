"""The distillation stage's trainer: TRL's own DistillationTrainer, a posttrain trainer (float32 masters, the
non-finite guard, the plugins' callbacks and dataset transforms), with the teacher loaded as posttrain loads
every frozen model (the compute dtype, the recipe's trust settings; sharded under ZeRO-3 by TRL's own
DeepSpeed preparation).

What is TRL's: sampling the student's completions (transformers or vLLM), the teacher's and the student's
forward passes, the generalised JSD over the completion tokens (chunked over the vocabulary), its evaluation
on held-out prompts, checkpointing and logging.
"""

from __future__ import annotations

from pathlib import Path

from trl import DistillationConfig, DistillationTrainer

from ..errors import UserError
from ..models import load_frozen_model, resolve_model_path
from ..plugin_set import PluginSet
from ..seams import reference_builder
from ..validate import Plan
from .guard import GuardedTrainer
from .parts import finish_trainer, trainer_parts

# DistillationConfig values that differ from TRL's defaults here, unless the recipe sets them.
DISTILLATION_DEFAULTS = {"logging_steps": 1}


class DistillationStageTrainer(GuardedTrainer, DistillationTrainer):
    """``trl.DistillationTrainer`` (a posttrain trainer: it stops at the first non-finite step)."""

    def __init__(self, *args, plugins: PluginSet, stage: str = "distillation", teacher=None, **kwargs):
        """``teacher``: a callable returning the frozen teacher; TRL builds it where it would load the teacher's
        path (under ZeRO-3, inside its DeepSpeed preparation)."""
        self.plugins = plugins
        self.stage = stage
        with reference_builder("distillation_trainer", teacher):
            super().__init__(*args, **kwargs)


def heldout_metrics(plan: Plan, trainer, heldout) -> dict:
    """TRL's evaluation of the held-out prompts: the student samples a completion of each, and the divergence to
    the teacher on it (the training loss's formula) is averaged."""
    if heldout is None:
        return {}
    raw = trainer.evaluate()
    return {"divergence": raw["eval_loss"]} if "eval_loss" in raw else {}


def summary_extras(trainer) -> dict:
    return {"teacher": trainer.teacher_path}


def build_trainer(plan: Plan, run_dir: Path):
    recipe = plan.recipe
    p = trainer_parts(plan, run_dir, config=lambda precision: _config(plan, run_dir, precision))
    teacher = resolve_model_path(plan.options.teacher)
    try:
        trainer = DistillationStageTrainer(
            model=p.model, teacher_model=teacher, args=p.config, train_dataset=p.train, eval_dataset=p.heldout,
            processing_class=p.tokenizer, peft_config=p.peft_config, callbacks=p.callbacks, plugins=plan.plugins,
            teacher=lambda: load_frozen_model(recipe, teacher, p.precision))
    except ValueError as e:
        if "vocab_size" not in str(e):
            raise
        raise UserError(f"the teacher {teacher} and the student do not share a vocabulary: {e}", field="teacher",
                        fix="distil from a teacher of the student's model family (the same tokenizer)") from None
    trainer.teacher_path = teacher
    return finish_trainer(trainer, p.precision), p.heldout


def _config(plan: Plan, run_dir: Path, precision):
    from .config import build_config

    return build_config(DistillationConfig, plan, run_dir, precision, DISTILLATION_DEFAULTS)
