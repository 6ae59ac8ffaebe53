"""``stage: sft``: supervised fine-tuning on prompt/completion pairs or conversations, the loss on the
completion, on TRL's SFTTrainer (``posttrain.trainers.sft``)."""

from __future__ import annotations

from pathlib import Path

from ..stage import COMMON_MANAGED, COMMON_RENAMED, GENERAL, MemoryFacts, Panel, Stage, StageResult, trl_config


class SFTStage(Stage):
    name = "sft"
    about = "supervised fine-tuning on prompt/completion pairs or conversations, loss on the completion"
    trainer = "trl.SFTTrainer"
    config = trl_config("trl", "trainer/sft_config.py", "SFTConfig")
    layouts = (("prompt", "completion"), ("messages",))
    managed = {
        "dataset_text_field": "the sft stage trains on prompt/completion or messages data: map your columns with "
                              "data.columns (e.g. {completion: chosen})",
        **COMMON_MANAGED,
    }
    renamed = {**COMMON_RENAMED, "max_seq_length": "use max_length"}
    hooks = (*GENERAL, "posttrain_token_mask", "posttrain_sample", "posttrain_reward")
    summary_rows = (("held-out completion NLL", "heldout", "completion_nll"),
                    ("held-out perplexity", "heldout", "perplexity"))
    panels = (Panel("loss", "training loss (completion NLL)", ("loss",)),
              Panel("token_accuracy", "next-token accuracy (training)", ("mean_token_accuracy",)),
              Panel("heldout_nll", "held-out completion NLL", ("heldout", "completion_nll"), "heldout"))

    def memory(self, cfg, plugins, recipe, *, prompt_length, max_positions, processes) -> MemoryFacts:
        facts = sequence_facts(cfg, max_positions, rows_per_example=1)
        if cfg.get("packing"):
            facts.notes.append("packing: every sequence is full (max_length tokens)")
        return facts

    def run(self, plan, run_dir: Path, resume: bool) -> StageResult:
        from ..trainers import sft
        from ..trainers.loop import run_training

        return StageResult(run_training(self, sft, plan, run_dir, resume), model=None)


def sequence_facts(cfg: dict, max_positions: int | None, rows_per_example: int, scored: bool = True) -> MemoryFacts:
    """A micro-batch of whole sequences cut at max_length (``rows_per_example`` sequences per example: 2 for a
    pair), as the sft, reward_model and preference stages batch them."""
    notes = []
    max_length = cfg.get("max_length")
    if max_length is None:
        max_length = max_positions or 4096
        notes.append(f"training.max_length is null (no truncation): assumed the model's longest, {max_length}")
    rows = rows_per_example * int(cfg.get("per_device_train_batch_size") or 8)
    unit = "sequences" if rows_per_example == 1 else f"sequences ({rows_per_example} per pair)"
    return MemoryFacts(rows=rows, seq_len=int(max_length), scored_tokens=rows * int(max_length) if scored else 0,
                       unit=unit, notes=notes)


STAGE = SFTStage()
