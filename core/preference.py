"""The preference stage: pairs in, a trained adapter/model and its metrics out (``trl.DPOTrainer``)."""

from __future__ import annotations

from pathlib import Path

from .models import load_model, load_tokenizer, resolve_model_path
from .stage import finish_trainer, load_data, platform_defaults, trainer_callbacks
from .trainer import PreferenceTrainer
from .validate import Plan

STAGE = "preference"
HELDOUT_KEYS = {
    "loss": "loss",
    "rewards/accuracies": "preference_accuracy",
    "rewards/margins": "reward_margin",
    "logps/accuracies": "logp_accuracy",
}


def heldout_metrics(plan: Plan, trainer, heldout) -> dict:
    """TRL's evaluation of the held-out pairs: loss, implicit-reward accuracy and margin, log-prob accuracy."""
    raw = trainer.evaluate()
    return {ours: raw[f"eval_{theirs}"] for theirs, ours in HELDOUT_KEYS.items() if f"eval_{theirs}" in raw}


def summary_extras(trainer) -> dict:
    return {}


def build_trainer(plan: Plan, run_dir: Path):
    recipe = plan.recipe
    train, heldout = load_data(plan)

    from trl import DPOConfig

    path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(recipe, path)
    model, peft_config = load_model(recipe, path)
    trl_values = {**platform_defaults(plan.trl_config), **plan.trl_config}
    config = DPOConfig(output_dir=str(run_dir), seed=recipe.seed, **trl_values)
    trainer = PreferenceTrainer(model=model, args=config, train_dataset=train, eval_dataset=heldout,
                                processing_class=tokenizer, peft_config=peft_config,
                                callbacks=trainer_callbacks(plan, run_dir), plugins=plan.plugins, stage=STAGE)
    return finish_trainer(trainer), heldout
