"""The kinds of stage a recipe can run, as plain data (no torch here).

A stage is one training run on one of TRL's trainers. Each kind lives in its own module of this
package, next to the shared run loop (``loop``) and the pipeline that chains stages
(``pipeline``); the module holds the stage's TRL trainer subclass and ``build_trainer``. What
validation needs to know about a kind without importing that module (its TRL config class, the
data columns it needs, the TRL fields posttrain owns, its default plugins) is below. Which hooks
each kind calls is part of the hook contract: ``posttrain.hookspecs.STAGE_HOOKS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageKind:
    name: str
    trainer: str  # the TRL trainer the stage's trainer subclasses
    config_chain: tuple  # the TRL config class and its bases, most derived first: (package, file, class)
    columns: tuple  # data columns the stage needs, after the recipe's column mapping
    about: str  # one line for the docs and `posttrain validate`
    alternative: tuple = ()  # another set of columns the stage accepts instead of `columns`
    default_plugins: dict = field(default_factory=dict)
    managed: dict = field(default_factory=dict)  # TRL field -> where to say it instead
    renamed: dict = field(default_factory=dict)  # field this TRL config lacks -> what to write instead

    @property
    def module(self) -> str:
        return f"posttrain.stages.{self.name}"

    @property
    def config_class(self) -> str:
        return self.config_chain[0][2] if self.config_chain else ""

    @property
    def trains(self) -> bool:
        return bool(self.config_chain)


_BASES = (("trl", "trainer/base_config.py", "_BaseConfig"), ("transformers", "training_args.py", "TrainingArguments"))

# TRL config fields that posttrain owns in every stage: setting them under `training` would be
# silently ignored or would fight a plugin, so the recipe is refused with the right place to say it.
_COMMON_MANAGED = {
    "output_dir": "use the recipe's top-level output_dir or `posttrain run --output-dir`",
    "seed": "use the recipe's top-level seed",
    "model_init_kwargs": "use the recipe's model section",
    "trust_remote_code": "use model.trust_remote_code",
    "sync_ref_model": "the reference update is a plugin: enable one implementing posttrain_update_reference "
                      "(e.g. ref_ema)",
    "ref_model_mixup_alpha": "the reference update is a plugin: set plugins.ref_ema.eta",
    "ref_model_sync_steps": "the reference update is a plugin: set plugins.ref_ema.every",
    "bf16": "set model.dtype: bfloat16 (the compute dtype; trained weights stay float32 masters)",
    "fp16": "set model.dtype: float16 (the compute dtype; trained weights stay float32 masters)",
}

# Fields that older transformers/TRL versions had (or that another stage has), with what to write instead.
_COMMON_RENAMED = {
    "warmup_ratio": "use warmup_steps: a float below 1 is a ratio of the total steps (e.g. warmup_steps: 0.1)",
    "evaluation_strategy": "use eval_strategy",
}

PREFERENCE = StageKind(
    name="preference",
    trainer="trl.DPOTrainer",
    config_chain=(("trl", "trainer/dpo_config.py", "DPOConfig"), *_BASES),
    columns=("prompt", "chosen", "rejected"),
    about="offline preference pairs (DPO and its family)",
    default_plugins={"dpo": {}},
    managed={
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
        **_COMMON_MANAGED,
    },
    renamed={
        **_COMMON_RENAMED,
        "max_prompt_length": "use max_length (TRL truncates prompt + response together)",
        "max_completion_length": "use max_length (TRL truncates prompt + response together)",
    },
)

ONLINE = StageKind(
    name="online",
    trainer="trl.GRPOTrainer",
    config_chain=(("trl", "trainer/grpo_config.py", "GRPOConfig"), *_BASES),
    columns=("prompt",),
    about="RL on the policy's own completions scored by reward plugins (GRPO, RLOO, RLVR)",
    managed={
        "scale_rewards": "advantages are plugins: enable advantage_norm (scope: group or batch) to scale them",
        "multi_objective_aggregation": "reward sources combine as a weighted sum (their `weight` options); shape "
                                       "advantages with posttrain_advantage_transform plugins such as advantage_norm",
        "reward_weights": "set the `weight` option of each reward plugin",
        **_COMMON_MANAGED,
    },
    renamed={
        **_COMMON_RENAMED,
        "max_length": "use max_completion_length (the generated part; GRPO does not truncate prompts)",
        "max_prompt_length": "GRPOTrainer does not truncate prompts: keep them short, or drop long ones with a "
                             "posttrain_transform_dataset plugin",
    },
)

SFT = StageKind(
    name="sft",
    trainer="trl.SFTTrainer",
    config_chain=(("trl", "trainer/sft_config.py", "SFTConfig"), *_BASES),
    columns=("prompt", "completion"),
    alternative=("messages",),
    about="supervised fine-tuning on prompt/completion pairs or conversations, loss on the completion",
    managed={
        "dataset_text_field": "the sft stage trains on prompt/completion or messages data: map your columns with "
                              "data.columns (e.g. {completion: chosen})",
        **_COMMON_MANAGED,
    },
    renamed={**_COMMON_RENAMED, "max_seq_length": "use max_length"},
)

REWARD_MODEL = StageKind(
    name="reward_model",
    trainer="trl.RewardTrainer",
    config_chain=(("trl", "trainer/reward_config.py", "RewardConfig"), *_BASES),
    columns=("prompt", "chosen", "rejected"),
    about="a Bradley-Terry reward model (a scalar head) on preference pairs",
    managed=_COMMON_MANAGED,
    renamed={**_COMMON_RENAMED, "max_prompt_length": "use max_length (the whole prompt + response)"},
)

ITERATIVE = StageKind(
    name="iterative",
    trainer="trl.DPOTrainer",
    config_chain=PREFERENCE.config_chain,
    columns=("prompt",),
    about="iterative DPO: rounds of sampling from the policy, scoring, pairing and DPO, the reference updated per "
          "round",
    default_plugins={"dpo": {}},
    managed={**PREFERENCE.managed,
             "precompute_ref_log_probs": "each round trains on new pairs, and the reference may move between rounds: "
                                         "its log-probs are computed as training goes"},
    renamed=PREFERENCE.renamed,
)

REJECTION_SAMPLING = StageKind(
    name="rejection_sampling",
    trainer="none (sampling and scoring only)",
    config_chain=(),
    columns=("prompt",),
    about="sample completions, score them, keep each prompt's best as an SFT dataset for the next stage",
)

STAGES = {kind.name: kind for kind in (SFT, REWARD_MODEL, PREFERENCE, ONLINE, ITERATIVE, REJECTION_SAMPLING)}
