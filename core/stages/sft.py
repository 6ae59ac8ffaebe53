"""``stage: sft``: supervised fine-tuning on prompt/completion pairs or conversations, the loss on the
completion, on TRL's SFTTrainer (``posttrain.trainers.sft``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import UserError
from ..stage import COMMON_MANAGED, COMMON_RENAMED, SETUP_HOOKS, MemoryFacts, Panel, Stage, StageResult, trl_config


class SFTStage(Stage):
    name = "sft"
    about = ("supervised fine-tuning on prompt/completion pairs, conversations (every assistant turn) or plain text, "
             "loss on the completion")
    trainer = "trl.SFTTrainer"
    config = trl_config("trl", "trainer/sft_config.py", "SFTConfig")
    layouts = (("prompt", "completion"), ("messages",), ("text",))
    managed = {
        "dataset_text_field": "the sft stage trains on prompt/completion, messages or text data: map your columns "
                              "with data.columns (e.g. {completion: chosen} or {text: content})",
        "chat_template_path": "set model.chat_template (inline Jinja or a .jinja file): every stage renders with it, "
                              "conversations with several assistant turns included, and it is saved with the model",
        **COMMON_MANAGED,
    }
    renamed = {**COMMON_RENAMED, "max_seq_length": "use max_length"}
    hooks = (*SETUP_HOOKS, "posttrain_token_mask", "posttrain_sample", "posttrain_reward")
    summary_rows = (("held-out completion NLL", "heldout", "completion_nll"),
                    ("held-out perplexity", "heldout", "perplexity"))
    panels = (Panel("loss", "training loss (completion NLL)", ("loss",)),
              Panel("token_accuracy", "next-token accuracy (training)", ("mean_token_accuracy",)),
              Panel("heldout_nll", "held-out completion NLL", ("heldout", "completion_nll"), "heldout"))

    @dataclass
    class Options:
        assistant_turns: Literal["every", "last"] = field(default="every", metadata={
            "help": "sft stage, conversations (`messages`): train on every assistant turn (TRL's assistant-only "
                    "loss, Tülu 3's SFT), whatever the chat template, or on the last one only."})

    def check(self, plan) -> None:
        if not plan.trl_config.get("assistant_only_loss"):
            return
        model = plan.recipe.model
        if model.chat_template is not None:
            from ..recipe import chat_template_text

            template = chat_template_text(model.chat_template)
        else:
            from ..models import local_chat_template

            template = local_chat_template(model.tokenizer or model.name_or_path)
        if template is not None and not re.search(r"\{%-?\s*generation\s*-?%\}", template):
            raise UserError("TRL's assistant_only_loss needs a chat template that marks the assistant's turns with "
                            "{% generation %}, and this model's has none", field="training.assistant_only_loss",
                            fix="remove it: the sft stage already trains every assistant turn of a conversation "
                                "(assistant_turns: every), for any chat template")

    def memory(self, cfg, plugins, recipe, *, prompt_length, max_positions, processes) -> MemoryFacts:
        facts = sequence_facts(cfg, max_positions, rows_per_example=1)
        if cfg.get("packing"):
            facts.notes.append("packing: every sequence is full (max_length tokens)")
        return facts

    def run(self, plan, run_dir: Path, resume: bool) -> StageResult:
        from ..trainers import sft
        from ..trainers.run import run_training

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
