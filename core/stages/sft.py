"""``stage: sft``: supervised fine-tuning on prompt/completion pairs or conversations, the loss on the
completion, on TRL's SFTTrainer (``posttrain.trainers.sft``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from ..errors import UserError
from ..stage import COMMON_MANAGED, COMMON_RENAMED, SETUP_HOOKS, MemoryFacts, Panel, sequence_facts, trl_config
from .trainer_stage import TrainerStage


class SFTStage(TrainerStage):
    name = "sft"
    about = ("supervised fine-tuning on prompt/completion pairs, conversations (every assistant turn) or plain text, "
             "loss on the completion")
    trainer = "trl.SFTTrainer"
    trainer_module = "sft"
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


STAGE = SFTStage()
