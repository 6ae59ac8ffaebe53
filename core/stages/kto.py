"""``stage: kto``: Kahneman-Tversky Optimisation on unpaired preference data (a prompt, a completion and
whether it is desirable), on TRL's KTOTrainer (``posttrain.trainers.kto``).

The loss is TRL's (Ethayarajh et al., 2024, eq. 7): with r = log π(y|x) − log π_ref(y|x) and z₀ the KL
estimate, ``max(0, mean over the batch of log π(y'|x) − log π_ref(y'|x))`` over mismatched pairs
(each prompt with the next example's completion),

    desirable:   w_d · (1 − σ(β·(r − z₀)))        undesirable:   w_u · (1 − σ(β·(z₀ − r)))

averaged over the batch; β, ``desirable_weight`` w_d, ``undesirable_weight`` w_u and ``loss_type`` (``kto``,
or ``apo_zero_unpaired`` without z₀) are KTOConfig's, under ``training``. Pairs (``prompt``, ``chosen``,
``rejected``) are accepted too and split into a desirable and an undesirable example each (TRL's
``unpair_preference_dataset``). With LoRA the reference is the adapter-disabled model; with full
fine-tuning a frozen copy in the compute dtype.
"""

from __future__ import annotations

from ..errors import UserError
from ..stage import COMMON_MANAGED, COMMON_RENAMED, SETUP_HOOKS, MemoryFacts, Panel, sequence_facts, trl_config
from .trainer_stage import TrainerStage


class KTOStage(TrainerStage):
    name = "kto"
    about = "KTO on unpaired preference data (prompt, completion, label: desirable or not), or pairs split in two"
    trainer = "trl.KTOTrainer"
    trainer_module = "kto"
    config = trl_config("trl", "trainer/kto_config.py", "KTOConfig")
    layouts = (("prompt", "completion", "label"), ("prompt", "chosen", "rejected"))
    managed = {
        **COMMON_MANAGED,
        "train_sampling_strategy": "KTO's KL estimate pairs each example with its neighbour in a fixed-order batch "
                                   "(TRL needs 'sequential'); posttrain shuffles the data once with the recipe's seed",
    }
    renamed = {**COMMON_RENAMED, "max_prompt_length": "use max_length (TRL truncates prompt + completion together)",
               "max_completion_length": "use max_length (TRL truncates prompt + completion together)"}
    hooks = (*SETUP_HOOKS, "posttrain_sample", "posttrain_reward")
    has_reference = True
    summary_rows = (("held-out KTO reward margin", "heldout", "reward_margin"),
                    ("held-out KL estimate", "heldout", "kl"))
    panels = (Panel("loss", "training loss (KTO)", ("loss",)),
              Panel("margin", "implicit reward: desirable - undesirable", ("rewards/margins",)),
              Panel("kl", "KL estimate z0", ("kl",)),
              Panel("heldout_margin", "held-out reward margin", ("heldout", "reward_margin"), "heldout"))

    def check(self, plan) -> None:
        if plan.recipe.model.reference is not None and plan.recipe.model.lora is not None:
            raise UserError("with LoRA, TRL's KTOTrainer takes the adapter-disabled model as the reference and no other",
                            field="model.reference",
                            fix="remove model.reference (the reference is then the starting model), or train without "
                                "LoRA")

    def memory(self, cfg, plugins, recipe, *, prompt_length, max_positions, processes) -> MemoryFacts:
        facts = sequence_facts(cfg, max_positions, rows_per_example=1)
        facts.notes.append("KTO: the KL estimate runs the policy and the reference once more on mismatched "
                           "completions, without gradients (not counted)")
        if cfg.get("precompute_ref_log_probs"):
            facts.reference = "precomputed"
        else:
            facts.reference = "copy" if recipe.model.lora is None or recipe.model.reference else "adapter"
        return facts


STAGE = KTOStage()
