"""The kto stage's trainer: TRL's own KTOTrainer, a posttrain trainer (float32 masters, the non-finite
guard, the plugins' callbacks and dataset transforms), fed unpaired examples."""

from __future__ import annotations

from pathlib import Path

from trl import KTOConfig, KTOTrainer

from ..data import as_bool
from ..errors import UserError
from ..models import load_frozen_model, load_model, load_tokenizer, resolve_model_path, run_precision
from ..registry import PluginSet
from ..seams import reference_builder
from ..validate import Plan
from .loop import GuardedTrainer, build_config, finish_trainer, load_data, trainer_callbacks

HELDOUT_KEYS = {"loss": "loss", "rewards/chosen": "desirable_reward", "rewards/rejected": "undesirable_reward",
                "rewards/margins": "reward_margin", "kl": "kl"}


class KTOStageTrainer(GuardedTrainer, KTOTrainer):
    """``trl.KTOTrainer`` (a posttrain trainer: it stops at the first non-finite step)."""

    def __init__(self, *args, plugins: PluginSet, stage: str = "kto", reference=False, **kwargs):
        self.plugins = plugins
        self.stage = stage
        with reference_builder("kto_trainer", reference):
            super().__init__(*args, **kwargs)


def unpaired(dataset, seed: int):
    """Examples as KTO takes them: pairs split into a desirable and an undesirable example (TRL's
    unpair_preference_dataset), labels as bools, in an order shuffled once with ``seed`` (TRL reads them in
    order: each batch's KL estimate pairs an example with its neighbour)."""
    if dataset is None:
        return None
    from trl.data_utils import unpair_preference_dataset

    if "completion" not in dataset.column_names and {"chosen", "rejected"} <= set(dataset.column_names):
        dataset = unpair_preference_dataset(dataset)
    for row, value in enumerate(dataset["label"]):
        if as_bool(value) is None:
            raise UserError(f"row {row} has label = {value!r}, which says neither desirable nor undesirable",
                            field="data.columns.label", fix="labels are true/false (or 1/0): fix or drop that row")
    dataset = dataset.map(lambda label: {"label": as_bool(label)}, input_columns=["label"])
    return dataset.shuffle(seed=seed)


def heldout_metrics(plan: Plan, trainer, heldout) -> dict:
    """TRL's evaluation of the held-out examples: loss, the desirable and undesirable implicit rewards and their
    margin, the KL estimate."""
    raw = trainer.evaluate()
    return {ours: raw[f"eval_{theirs}"] for theirs, ours in HELDOUT_KEYS.items() if f"eval_{theirs}" in raw}


def summary_extras(trainer) -> dict:
    return {}


def build_trainer(plan: Plan, run_dir: Path):
    recipe = plan.recipe
    train, heldout = load_data(plan)
    train, held_examples = unpaired(train, recipe.seed), unpaired(heldout, recipe.seed)
    precision = run_precision(recipe)
    config = build_config(KTOConfig, plan, run_dir, precision)
    path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(recipe, path)
    model, peft_config = load_model(recipe, path, precision)
    reference = resolve_model_path(recipe.model.reference or recipe.model.name_or_path)
    trainer = KTOStageTrainer(model=model, args=config, train_dataset=train, eval_dataset=held_examples,
                              processing_class=tokenizer, peft_config=peft_config,
                              reference=lambda: load_frozen_model(recipe, reference, precision),
                              callbacks=trainer_callbacks(plan, run_dir), plugins=plan.plugins)
    return finish_trainer(trainer, precision), heldout  # the held-out prompts once each, for the greedy answers
