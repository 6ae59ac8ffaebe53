"""The kto stage's trainer: TRL's own KTOTrainer, a posttrain trainer (float32 masters, the non-finite
guard, the plugins' callbacks and dataset transforms), fed unpaired examples."""

from __future__ import annotations

from pathlib import Path

from trl import KTOConfig, KTOTrainer

from ..data import as_bool
from ..errors import UserError
from ..models import load_frozen_model, resolve_model_path
from ..plugin_set import PluginSet
from ..seams import reference_builder
from ..validate import Plan
from .guard import GuardedTrainer
from .parts import finish_trainer, token_lengths, trainer_parts

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
    p = trainer_parts(plan, run_dir, KTOConfig)
    reference = resolve_model_path(recipe.model.reference or recipe.model.name_or_path)
    train, heldout = unpaired(p.train, recipe.seed), unpaired(p.heldout, recipe.seed)
    # pairs are two examples each from here: what TRL drops is counted against the examples it was given
    plan.data_sizes = {"train": len(train), "eval": len(heldout) if heldout is not None else None}
    trainer = KTOStageTrainer(model=p.model, args=p.config, train_dataset=train,
                              eval_dataset=heldout, processing_class=p.tokenizer,
                              peft_config=p.peft_config, reference=lambda: load_frozen_model(recipe, reference, p.precision),
                              callbacks=p.callbacks, plugins=plan.plugins)
    return finish_trainer(trainer, p.precision), p.heldout  # the held-out prompts once each, for the greedy answers


DROPPED = ("examples whose prompt alone fills training.max_length = {max_length} tokens (TRL's KTOTrainer drops "
           "them)")


def rows_cut(trainer, split: str, dataset) -> tuple[int, int, str]:
    """The examples TRL's collator cuts at max_length: prompt + completion longer than it (its start kept)."""
    lengths = token_lengths(dataset, "prompt_ids") + token_lengths(dataset, "completion_ids")
    return int((lengths > trainer.args.max_length).sum()), len(dataset), "truncation_mode keep_start"
