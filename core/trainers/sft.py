"""The sft stage: prompt/completion pairs (or conversations) in, a model fine-tuned on the completions
out, on ``SFTStageTrainer``, TRL's own SFTTrainer.

What is TRL's: tokenisation and chat templates, the completion-only loss (the prompt's tokens are
not trained on), packing and padding-free batching (``training.packing``, ``training.padding_free``),
the fused LM head, checkpointing and logging. What is ours, through small overrides:

- data: a ``messages`` conversation becomes a prompt (every turn before the last) and a completion
  (the last, assistant, turn), so the loss is on the final reply; with
  ``training.assistant_only_loss: true`` the conversation is left whole and TRL trains on every
  assistant turn (the chat template must mark them with ``{% generation %}``);
- token masks: ``posttrain_token_mask`` plugins remove tokens from the loss; they are applied by the
  collator, so the loss is normalised by the tokens that are really trained on;
- held-out numbers: the completion NLL (TRL's evaluation loss, a mean over completion tokens), its
  perplexity and the next-token accuracy, before and after; greedy answers scored by the reward
  plugins when one is enabled (``stages.loop.answer_metrics``).

"SFT on the chosen responses of a preference dataset" is a data mapping, ``columns: {completion:
chosen}``: the preference data's rejected column is left unused.
"""

from __future__ import annotations

import math
from pathlib import Path

from trl import SFTConfig, SFTTrainer

from ..registry import PluginSet, contract_error
from ..validate import Plan
from .loop import GuardedTrainer, finish_trainer, trainer_parts

STAGE = "sft"


def conversation_to_completion(example: dict) -> dict:
    """A ``messages`` conversation as a prompt (the turns before the last) and a completion (the last)."""
    messages = example["messages"]
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message of every conversation must be the assistant's reply")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


class TokenMaskCollator:
    """TRL's collator, then the ``posttrain_token_mask`` plugins: a token a plugin drops gets label -100."""

    def __init__(self, collator, plugins: PluginSet, tokenizer):
        self.collator, self.plugins, self.tokenizer = collator, plugins, tokenizer

    def __call__(self, examples):
        batch = self.collator(examples)
        labels = batch["labels"]
        completion = (labels != -100).long()
        for name, keep in self.plugins.call_each("posttrain_token_mask", input_ids=batch["input_ids"],
                                                 completion_mask=completion, tokenizer=self.tokenizer):
            if keep is None:
                continue
            if tuple(keep.shape) != tuple(labels.shape):
                raise contract_error(name, "posttrain_token_mask", keep,
                                     f"a mask of shape {tuple(labels.shape)}, one row per sequence")
            labels = labels.masked_fill(keep.to(labels.device) == 0, -100)
        batch["labels"] = labels
        return batch


class SFTStageTrainer(GuardedTrainer, SFTTrainer):
    """``trl.SFTTrainer`` whose token masks come from the enabled plugins (and which stops at the first
    non-finite step, like every posttrain trainer)."""

    def __init__(self, *args, plugins: PluginSet, stage: str = STAGE, **kwargs):
        self.plugins = plugins
        self.stage = stage
        super().__init__(*args, **kwargs)
        if plugins.implementers("posttrain_token_mask"):
            self.data_collator = TokenMaskCollator(self.data_collator, plugins, self.processing_class)


def heldout_metrics(plan: Plan, trainer, heldout) -> dict:
    """TRL's evaluation of the held-out completions: NLL per completion token, perplexity, token accuracy."""
    raw = trainer.evaluate()
    out = {}
    if "eval_loss" in raw:
        out["completion_nll"] = raw["eval_loss"]
        out["perplexity"] = math.exp(min(raw["eval_loss"], 50.0))
    if "eval_mean_token_accuracy" in raw:
        out["token_accuracy"] = raw["eval_mean_token_accuracy"]
    return out


def summary_extras(trainer) -> dict:
    return {}


def _as_prompt_completion(plan: Plan, dataset):
    if dataset is None or "messages" not in dataset.column_names or "completion" in dataset.column_names:
        return dataset
    if plan.trl_config.get("assistant_only_loss"):
        return dataset  # TRL trains on every assistant turn of the whole conversation
    return dataset.map(conversation_to_completion, remove_columns=["messages"], desc="Splitting conversations")


def build_trainer(plan: Plan, run_dir: Path):
    p = trainer_parts(plan, run_dir, SFTConfig)
    train, heldout = _as_prompt_completion(plan, p.train), _as_prompt_completion(plan, p.heldout)
    trainer = SFTStageTrainer(model=p.model, args=p.config, train_dataset=train, eval_dataset=heldout,
                              processing_class=p.tokenizer, peft_config=p.peft_config, callbacks=p.callbacks,
                              plugins=plan.plugins)
    return finish_trainer(trainer, p.precision), heldout

