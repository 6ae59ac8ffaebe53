"""``stage: reward_model``: a Bradley-Terry reward model (a scalar head) on preference pairs, on TRL's
RewardTrainer (``posttrain.trainers.reward_model``)."""

from __future__ import annotations

from ..stage import SETUP_HOOKS, MemoryFacts, Panel, Stage, sequence_facts, trl_config
from .trainer_stage import TrainerStage


class RewardModelStage(TrainerStage):
    name = "reward_model"
    about = "a Bradley-Terry reward model (a scalar head) on preference pairs"
    trainer = "trl.RewardTrainer"
    trainer_module = "reward_model"
    config = trl_config("trl", "trainer/reward_config.py", "RewardConfig")
    layouts = (("prompt", "chosen", "rejected"),)
    renamed = {**Stage.renamed, "max_prompt_length": "use max_length (the whole prompt + response)"}
    hooks = SETUP_HOOKS
    head = "reward"
    summary_rows = (("held-out pairwise accuracy", "heldout", "pairwise_accuracy"),
                    ("held-out reward margin", "heldout", "reward_margin"))
    pipeline_keys = ("reward_stats",)
    panels = (Panel("loss", "training loss (Bradley-Terry)", ("loss",)),
              Panel("accuracy", "pairwise accuracy (training)", ("accuracy",)),
              Panel("margin", "reward margin, chosen - rejected (training)", ("margin",)),
              Panel("heldout_accuracy", "held-out pairwise accuracy", ("heldout", "pairwise_accuracy"), "heldout"),
              Panel("heldout_margin", "held-out reward margin", ("heldout", "reward_margin"), "heldout"))

    def memory(self, cfg, plugins, recipe, *, prompt_length, max_positions, processes) -> MemoryFacts:
        facts = sequence_facts(cfg, max_positions, rows_per_example=2, scored=False)  # chosen and rejected together
        facts.reward_head = True
        return facts


STAGE = RewardModelStage()
