"""The preference stage: pairs in, a trained adapter/model and its metrics out, on ``PreferenceTrainer``,
TRL's own DPOTrainer with the loss and batching taken from hooks.

``_compute_loss`` is replaced (TRL computes every preference loss in that one method); the
forward passes use TRL's fused LM head and its reference helper (``compute_ref_log_probs``,
which disables the LoRA adapter instead of holding a second copy of the model). The other
overrides are small: the train sampler and collator may come from plugins, and a gold
``reference`` response is tokenised and kept when a plugin requires it. Data preparation,
tokenisation, collation, precomputed reference log-probs, DeepSpeed/FSDP preparation,
checkpointing and logging are TRL's and transformers'.
"""

from __future__ import annotations

from pathlib import Path

import torch
from trl import DPOConfig, DPOTrainer

from ..errors import UserError
from ..models import load_frozen_model, resolve_model_path
from ..errors import contract_error
from ..plugin_set import PluginSet, required_columns
from ..seams import reference_builder, tokenize, triple_preference_collator
from ..types import PreferenceLogps
from ..validate import Plan
from .callbacks import ReferenceUpdateCallback
from .guard import GuardedTrainer
from .parts import finish_trainer, token_lengths, trainer_parts

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
GOLD_COLUMN = "reference"  # a gold response per example (TPO), when a plugin requires it


class PreferenceTrainer(GuardedTrainer, DPOTrainer):
    """``trl.DPOTrainer`` whose loss, token masks, metrics, sampler, collator and reference
    updates come from the enabled plugins."""

    def __init__(self, *args, plugins: PluginSet, stage: str = "preference", reference=False, **kwargs):
        """``reference``: how the frozen reference copy of full fine-tuning is built, a callable returning the
        model (posttrain loads it in the compute dtype); ``False`` leaves it to TRL. When no plugin needs a
        reference (a reference-free loss such as SimPO) none is built: TRL then skips everything it does
        with the reference."""
        self.plugins = plugins
        self.stage = stage
        self.uses_reference = plugins.reference_needed(stage)
        self.uses_gold = GOLD_COLUMN in required_columns(plugins, stage)
        with reference_builder("dpo_trainer", reference if self.uses_reference else None):
            super().__init__(*args, **kwargs)
        if self.uses_gold:
            # batches laid out as [chosen; rejected; gold]
            self.data_collator = triple_preference_collator()(
                pad_token_id=self._tokenizer.pad_token_id, max_length=self.args.max_length,
                truncation_mode=self.args.truncation_mode, pad_to_multiple_of=self.args.pad_to_multiple_of)
        collator = plugins.call("posttrain_data_collator", tokenizer=self.processing_class,
                                default=self.data_collator, stage=stage)
        if collator is not None:
            self.data_collator = collator
        if plugins.implementers("posttrain_update_reference"):
            self.add_callback(ReferenceUpdateCallback(self))

    def compute_ref_log_probs(self, model, inputs):
        """TRL's reference pass (the reference model, or the LoRA policy with its adapter disabled or its
        ``ref`` adapter), its per-token log-probs kept in ``self._ref_token_logps`` as well as the sums TRL
        returns."""
        captured = {}

        class Keep:  # TRL calls the model once; keep what it returns
            def __call__(self, *args, **kwargs):
                out = model(*args, **kwargs)
                captured["log_probs"] = out.log_probs
                return out

            def __getattr__(self, name):
                return getattr(model, name)

        chosen, rejected = super().compute_ref_log_probs(Keep(), inputs)
        shift_mask = inputs["completion_mask"][..., 1:]
        tokens = captured["log_probs"][:, -shift_mask.size(1):] * shift_mask
        self._ref_token_logps = tokens.chunk(2, dim=0)
        return chosen, rejected

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if self.uses_gold and "prompt" not in next(iter(dataset)):
            raise UserError(f"the gold '{GOLD_COLUMN}' responses need an explicit 'prompt' column",
                            field="data.columns.prompt", fix="add or map a prompt column")
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self.uses_gold and "reference_ids" not in dataset.column_names:
            dataset = dataset.map(_tokenize_gold, fn_kwargs={"tokenizer": self._tokenizer},
                                  desc=f"Tokenizing the gold responses of the {dataset_name} dataset")
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.uses_gold and "reference_ids" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "reference_ids"]

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        sampler = self.plugins.call("posttrain_train_sampler", dataset=dataset,
                                    batch_size=self.args.per_device_train_batch_size, seed=self.args.seed,
                                    stage=self.stage)
        return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

    def _pair_rows(self, inputs: dict) -> dict:
        """The chosen and rejected rows of a batch (without the gold rows, if any)."""
        if not self.uses_gold:
            return inputs
        rows = inputs["input_ids"].shape[0] // 3 * 2
        return {k: (v[:rows] if k in ("input_ids", "attention_mask", "completion_mask") else v)
                for k, v in inputs.items()}

    def _apply_token_masks(self, inputs: dict) -> dict:
        pairs = self._pair_rows(inputs)
        masks = [(name, m) for name, m in self.plugins.call_each(
            "posttrain_token_mask", input_ids=pairs["input_ids"], completion_mask=pairs["completion_mask"],
            tokenizer=self.processing_class) if m is not None]
        if not masks:
            return inputs
        mask = inputs["completion_mask"].clone()
        rows = pairs["completion_mask"].shape[0]
        for name, m in masks:
            if tuple(m.shape) != tuple(pairs["completion_mask"].shape):
                raise contract_error(name, "posttrain_token_mask", m, "a mask of shape "
                                     f"{tuple(pairs['completion_mask'].shape)}, like the completion mask")
            mask[:rows] = mask[:rows] * m.to(device=mask.device, dtype=mask.dtype)
        return {**inputs, "completion_mask": mask}

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        inputs = self._apply_token_masks(inputs)
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = shift_mask.size(1)
        per_token_logps = outputs.log_probs[:, -seq_len:] * shift_mask
        blocks = 3 if self.uses_gold else 2  # [chosen; rejected] or [chosen; rejected; gold]
        token_blocks, mask_blocks = per_token_logps.chunk(blocks, dim=0), shift_mask.chunk(blocks, dim=0)

        ref_chosen = ref_rejected = None
        ref_tokens = (None, None)
        if self.uses_reference:
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_chosen, ref_rejected = self.compute_ref_log_probs(
                    self.ref_model if self.ref_model is not None else model, self._pair_rows(inputs))
                ref_tokens = self._ref_token_logps

        logps = PreferenceLogps(
            chosen_logps=token_blocks[0].sum(dim=1), rejected_logps=token_blocks[1].sum(dim=1),
            ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
            chosen_lengths=mask_blocks[0].sum(dim=1), rejected_lengths=mask_blocks[1].sum(dim=1),
            chosen_token_logps=token_blocks[0], rejected_token_logps=token_blocks[1],
            chosen_mask=mask_blocks[0], rejected_mask=mask_blocks[1], training=mode == "train",
            ref_chosen_token_logps=ref_tokens[0], ref_rejected_token_logps=ref_tokens[1],
        )
        if self.uses_gold:
            logps.gold_token_logps, logps.gold_mask = token_blocks[2], mask_blocks[2]
            logps.gold_logps, logps.gold_lengths = token_blocks[2].sum(dim=1), mask_blocks[2].sum(dim=1)
        result = self.preference_loss(logps)
        loss = result.losses.mean()

        metrics = self._metrics[mode]
        seen_terms: dict[str, str] = {}
        for plugin_name, terms in self.plugins.call_each("posttrain_loss_terms", logps=logps):
            for term_name, value in (terms or {}).items():
                if term_name in seen_terms:
                    raise UserError(f"plugins '{seen_terms[term_name]}' and '{plugin_name}' both add a loss term "
                                    f"named '{term_name}'", field="plugins", fix="enable only one of them")
                seen_terms[term_name] = plugin_name
                loss = loss + value
                metrics[f"loss/{term_name}"].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())

        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        self._log_pair_metrics(metrics, mode, inputs, logps, result)
        extra_seen: dict[str, str] = {}
        for plugin_name, extra in self.plugins.call_each("posttrain_step_metrics", logps=logps, stage=self.stage):
            for key, value in (extra or {}).items():
                if key in extra_seen:
                    raise UserError(f"plugins '{extra_seen[key]}' and '{plugin_name}' both report metric '{key}'",
                                    field="plugins", fix="enable only one of them")
                extra_seen[key] = plugin_name
                metrics[key].append(float(value))

        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def preference_loss(self, logps: PreferenceLogps):
        """The loss owner's result, checked against the hook's contract: one loss and one reward of each
        response per pair."""
        owner = self.plugins.implementers("posttrain_preference_loss")[0]
        result = self.plugins.call("posttrain_preference_loss", logps=logps)
        pairs = (logps.chosen_logps.shape[0],)
        expected = f"a posttrain.PreferenceLoss whose losses, chosen_rewards and rejected_rewards have shape {pairs}"
        if result is None:
            raise contract_error(owner, "posttrain_preference_loss", result, expected)
        for part in ("losses", "chosen_rewards", "rejected_rewards"):
            value = getattr(result, part)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != pairs:
                raise contract_error(owner, "posttrain_preference_loss", value, f"{part}: {expected}")
        return result

    def _log_pair_metrics(self, metrics, mode, inputs, logps: PreferenceLogps, result) -> None:
        gather = self.accelerator.gather_for_metrics
        if mode == "train":
            num_tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen_r = gather(result.chosen_rewards.detach())
        rejected_r = gather(result.rejected_rewards.detach())
        margins = chosen_r - rejected_r
        metrics["rewards/chosen"].append(chosen_r.mean().item())
        metrics["rewards/rejected"].append(rejected_r.mean().item())
        metrics["rewards/margins"].append(margins.mean().item())
        # Ties count half: before any training the implicit rewards are all 0 (policy = reference).
        metrics["rewards/accuracies"].append(((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item())
        c, r = gather(logps.chosen_logps.detach()), gather(logps.rejected_logps.detach())
        metrics["logps/chosen"].append(c.mean().item())
        metrics["logps/rejected"].append(r.mean().item())
        metrics["logps/accuracies"].append(((c > r).float() + 0.5 * (c == r).float()).mean().item())


def _tokenize_gold(example: dict, tokenizer) -> dict:
    """Token ids of the gold response, continuing the example's tokenised prompt (as TRL does for
    chosen and rejected: the prompt rendered alone, then prompt + response, split where they part)."""
    from trl.data_utils import is_conversational

    gold = example[GOLD_COLUMN]
    if is_conversational(example):
        kwargs = example.get("chat_template_kwargs") or {}
        full = tokenize(tokenizer, example["prompt"] + gold, **kwargs)["input_ids"]
    else:
        if not gold.endswith(tokenizer.eos_token):
            gold = gold + tokenizer.eos_token
        full = tokenize(tokenizer, example["prompt"] + gold)["input_ids"]
    return {"reference_ids": full[len(example["prompt_ids"]):]}


# -- the stage ---------------------------------------------------------------------------------

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
    p = trainer_parts(plan, run_dir, DPOConfig)
    extra = {"reference": lambda: load_frozen_model(recipe, p.path, p.precision)}
    if recipe.model.reference is not None and plan.plugins.reference_needed(STAGE):
        # another model as the reference: given to TRL as ref_model (with LoRA too, where it replaces the
        # adapter-disabled base)
        extra = {"ref_model": load_frozen_model(recipe, resolve_model_path(recipe.model.reference), p.precision)}
    trainer = PreferenceTrainer(model=p.model, args=p.config, train_dataset=p.train, eval_dataset=p.heldout,
                                processing_class=p.tokenizer, peft_config=p.peft_config, **extra,
                                callbacks=p.callbacks, plugins=plan.plugins, stage=STAGE)
    return finish_trainer(trainer, p.precision), p.heldout

DROPPED = ("pairs whose prompt alone fills training.max_length = {max_length} tokens (TRL's DPOTrainer drops "
           "them)")


def rows_cut(trainer, split: str, dataset) -> tuple[int, int, str]:
    """The pairs TRL's collator cuts at max_length: prompt + chosen or prompt + rejected (or prompt + the gold
    response) longer than it."""
    import numpy as np

    responses = ["chosen_ids", "rejected_ids"] + (["reference_ids"] if "reference_ids" in dataset.column_names else [])
    longest = np.maximum.reduce([token_lengths(dataset, c) for c in responses])
    cut = int(((token_lengths(dataset, "prompt_ids") + longest) > trainer.args.max_length).sum())
    return cut, len(dataset), f"truncation_mode {trainer.args.truncation_mode}"
