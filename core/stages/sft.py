"""``stage: sft``: supervised fine-tuning on prompt/completion pairs or conversations, the loss on the
completion, on TRL's SFTTrainer (``posttrain.trainers.sft``)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import UserError
from ..stage import COMMON_MANAGED, COMMON_RENAMED, GENERAL, MemoryFacts, Panel, Stage, StageResult, trl_config


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
        **COMMON_MANAGED,
    }
    renamed = {**COMMON_RENAMED, "max_seq_length": "use max_length"}
    hooks = (*GENERAL, "posttrain_token_mask", "posttrain_sample", "posttrain_reward")
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
        template = chat_template_text(plan.recipe.model.name_or_path)
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
        from ..trainers.loop import run_training

        return StageResult(run_training(self, sft, plan, run_dir, resume), model=None)


def chat_template_text(name_or_path: str) -> str | None:
    """The chat template of a local model folder (or a built-in model already converted), read without loading a
    tokenizer; None when it cannot be read here (a hub id, a pipeline stage's output)."""
    from ..models import BUILTIN_MODELS, cache_dir

    if name_or_path.startswith("builtin:"):
        name = name_or_path.split(":", 1)[1]
        folder = cache_dir() / "models" / name if name in BUILTIN_MODELS else None
    else:
        folder = Path(name_or_path).expanduser()
    if folder is None or not folder.is_dir():
        return None
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates
            template = " ".join(str(t.get("template", "")) for t in template)
        return template if isinstance(template, str) else ""
    return None


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
