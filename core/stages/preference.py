"""``stage: preference``: offline preference pairs, DPO and its family, the loss a plugin, on TRL's
DPOTrainer (``posttrain.trainers.preference``)."""

from __future__ import annotations

from ..stage import COMMON_MANAGED, COMMON_RENAMED, SETUP_HOOKS, MemoryFacts, Panel, sequence_facts, trl_config
from .trainer_stage import TrainerStage

GOLD_COLUMN = "reference"  # a gold response per example (TPO), when a plugin requires it

# The DPOConfig fields a loss plugin owns, with where to say them instead.
LOSS_MANAGED = {
    "beta": "the loss plugin owns it: set plugins.<loss plugin>.beta (e.g. plugins.dpo.beta)",
    "loss_type": "the loss is a plugin: enable the loss plugin you want under `plugins`",
    "loss_weights": "the loss is a plugin: add terms with plugins implementing posttrain_loss_terms",
    "label_smoothing": "the loss is a plugin: set it in the loss plugin's options",
    "f_divergence_type": "the loss is a plugin: enable a plugin for that divergence",
    "f_alpha_divergence_coef": "the loss is a plugin: enable a plugin for that divergence",
    "ld_alpha": "the loss is a plugin: enable a plugin for length-desensitised DPO",
    "use_weighting": "the loss is a plugin: enable a plugin for WPO weighting",
    "discopop_tau": "the loss is a plugin",
    "padding_free": "TRL 1.16's DPOTrainer switches padding_free off (it falls back to padding); padding-free "
                    "batching applies to the sft stage",
    **COMMON_MANAGED,
}
PAIR_RENAMED = {
    **COMMON_RENAMED,
    "max_prompt_length": "use max_length (TRL truncates prompt + response together)",
    "max_completion_length": "use max_length (TRL truncates prompt + response together)",
}
PAIR_HOOKS = (
    *SETUP_HOOKS, "posttrain_reference_needed", "posttrain_step_metrics", "posttrain_preference_loss",
    "posttrain_loss_terms", "posttrain_sample", "posttrain_reward", "posttrain_update_reference",
    "posttrain_token_mask", "posttrain_data_collator", "posttrain_train_sampler",
)


class PreferenceStage(TrainerStage):
    name = "preference"
    about = "offline preference pairs (DPO and its family)"
    trainer = "trl.DPOTrainer"
    trainer_module = "preference"
    config = trl_config("trl", "trainer/dpo_config.py", "DPOConfig")
    layouts = (("prompt", "chosen", "rejected"),)
    default_plugins = {"dpo": {}}
    managed = LOSS_MANAGED
    renamed = PAIR_RENAMED
    hooks = PAIR_HOOKS
    required_hooks = ("posttrain_preference_loss",)
    has_reference = True
    summary_rows = (("held-out preference accuracy", "heldout", "preference_accuracy"),
                    ("held-out log-prob accuracy", "heldout", "logp_accuracy"),
                    ("held-out reward margin", "heldout", "reward_margin"))
    panels = (Panel("loss", "training loss", ("loss",)),
              Panel("margin", "reward margin (chosen - rejected)", ("rewards/margins",)),
              Panel("logps", "log-probs: chosen (solid), rejected (dashed)", ("logps/chosen", "logps/rejected")),
              Panel("heldout", "held-out preference accuracy", ("heldout", "preference_accuracy"), "heldout"))

    def memory(self, cfg, plugins, recipe, *, prompt_length, max_positions, processes) -> MemoryFacts:
        from ..plugin_set import required_columns

        gold = GOLD_COLUMN in required_columns(plugins, self.name)
        facts = sequence_facts(cfg, max_positions, rows_per_example=3 if gold else 2)  # chosen, rejected (+ gold)
        if not plugins.reference_needed(self.name):
            facts.reference = "none"
            facts.notes.append("reference-free loss: no reference model")
        elif cfg.get("precompute_ref_log_probs"):
            facts.reference = "precomputed"
            facts.notes.append("precompute_ref_log_probs: reference log-probs are computed before training; no "
                               "reference model while training")
        elif recipe.model.reference is not None or recipe.model.lora is None:
            facts.reference = "copy"
        else:
            facts.reference = "adapter"
        return facts


STAGE = PreferenceStage()
