"""The reward_model stage: preference pairs in, a Bradley-Terry reward model out, on
``RewardModelTrainer``, TRL's own RewardTrainer.

The model is the starting causal LM with a new scalar head (``AutoModelForSequenceClassification``,
one label) that reads the last token: r(x, y). The loss is TRL's, -log σ(r(x, y_w) - r(x, y_l)),
minus an optional per-pair ``margin`` column inside the σ, plus TRL's reward centring
(``training.center_rewards_coefficient``). With LoRA the head is trained in full and saved with the
adapter (peft's sequence-classification task). Tokenisation (plain text ends with EOS; chat data
is rendered with the chat template), the collator, checkpointing and logging are TRL's.

Held-out numbers before and after: pairwise accuracy (the share of held-out pairs whose chosen
response scores higher), the mean margin and the loss. The stage also writes the mean and standard
deviation of its scores on the held-out responses to ``reward_stats.json`` next to the saved model,
which the ``reward_model`` reward source reads for ``normalize: heldout``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from trl import RewardConfig, RewardTrainer

from ..classifier import STATS_FILE
from ..plugin_set import PluginSet
from ..validate import Plan
from .guard import GuardedTrainer
from .parts import finish_trainer, trainer_parts

STAGE = "reward_model"
HELDOUT_KEYS = {"accuracy": "pairwise_accuracy", "margin": "reward_margin", "loss": "loss",
                "mean_reward": "mean_reward"}


class RewardModelTrainer(GuardedTrainer, RewardTrainer):
    """``trl.RewardTrainer`` (a posttrain trainer: it stops at the first non-finite step)."""

    def __init__(self, *args, plugins: PluginSet, stage: str = STAGE, **kwargs):
        self.plugins = plugins
        self.stage = stage
        super().__init__(*args, **kwargs)

    @torch.no_grad()
    def heldout_scores(self) -> tuple[list[float], list[float]]:
        """The model's scores of every held-out chosen and rejected response."""
        chosen, rejected = [], []
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            for batch in self.get_eval_dataloader():
                batch = self._prepare_inputs(batch)
                with self.accelerator.autocast():
                    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                c, r = scores.squeeze(-1).float().chunk(2)
                chosen += c.tolist()
                rejected += r.tolist()
        finally:
            model.train(was_training)
        return chosen, rejected


def reward_stats(chosen: list[float], rejected: list[float]) -> dict:
    scores = chosen + rejected
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(1, len(scores) - 1))
    return {"mean": mean, "std": std, "n": len(scores),
            "pairwise_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / max(1, len(chosen))}


def heldout_metrics(plan: Plan, trainer, heldout) -> dict:
    """TRL's evaluation of the held-out pairs: pairwise accuracy, mean margin, loss, mean reward."""
    raw = trainer.evaluate()
    return {ours: raw[f"eval_{theirs}"] for theirs, ours in HELDOUT_KEYS.items() if f"eval_{theirs}" in raw}


def summary_extras(trainer) -> dict:
    """The trained model's score statistics on the held-out responses, also written next to the model."""
    if trainer.eval_dataset is None:
        return {}
    stats = reward_stats(*trainer.heldout_scores())
    final = Path(trainer.args.output_dir) / "final"
    if trainer.is_world_process_zero() and final.is_dir():
        (final / STATS_FILE).write_text(json.dumps(stats, indent=2))
    return {"reward_stats": stats}


def build_trainer(plan: Plan, run_dir: Path):
    p = trainer_parts(plan, run_dir, RewardConfig, reward_head=True)
    p.model.config.pad_token_id = p.tokenizer.pad_token_id  # the head reads the last non-padding token
    trainer = RewardModelTrainer(model=p.model, args=p.config, train_dataset=p.train, eval_dataset=p.heldout,
                                 processing_class=p.tokenizer, peft_config=p.peft_config, callbacks=p.callbacks,
                                 plugins=plan.plugins)
    return finish_trainer(trainer, p.precision), p.heldout

DROPPED = "pairs longer than training.max_length = {max_length} tokens (TRL's RewardTrainer drops them)"


def rows_cut(trainer, split: str, dataset) -> tuple[int, int, str]:
    """No pair is cut: TRL's RewardTrainer drops the pairs longer than max_length (counted as dropped) instead."""
    return 0, len(dataset), ""
