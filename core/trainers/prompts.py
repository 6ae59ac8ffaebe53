"""The prompts of the stages that generate from them: the form they reach the model in (``data.prompt_format``,
``data.system_prompt``, decided again when a run loads its data) and the prompt-length limit
(``data.max_prompt_length``: cut on the left or dropped, counted)."""

from __future__ import annotations

from ..errors import UserError
from ..validate import Plan


def run_prompt_form(plan: Plan):
    """How the run's prompts reach the model (``data.prompt_format``, ``data.system_prompt``): decided as at
    validation, with the tokenizer asked where validation could not read its chat template (a hub id, an earlier
    pipeline stage's output)."""
    from ..data import prompt_form
    from ..models import has_chat_template, load_tokenizer, resolve_model_path

    recipe = plan.recipe
    known = has_chat_template(recipe.model)
    if known is None and (recipe.data.prompt_format == "auto" and recipe.kind.generates):
        known = bool(load_tokenizer(recipe, resolve_model_path(recipe.model.name_or_path)).chat_template)
    plan.prompt_form = prompt_form(recipe, known)
    return plan.prompt_form


def _prompt_ids(tokenizer, prompt) -> list:
    """A prompt's tokens as GRPOTrainer makes them: a conversation rendered with the generation prompt, a text
    with the tokenizer's special tokens."""
    if isinstance(prompt, list):
        out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def _cut_left(tokenizer, text: str, drop: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[min(drop, len(ids)):], skip_special_tokens=False)


def _prompt_within(tokenizer, prompt, limit: int):
    """The prompt cut on the left to at most ``limit`` tokens (a conversation loses the start of its first
    non-system turn), or None when it cannot fit."""
    over = len(_prompt_ids(tokenizer, prompt)) - limit
    if over <= 0:
        return prompt
    for _ in range(8):  # re-tokenising the cut text may merge a token or two differently: cut again
        if isinstance(prompt, list):
            turn = next((i for i, m in enumerate(prompt) if m.get("role") != "system"), None)
            if turn is None or not isinstance(prompt[turn].get("content"), str) or not prompt[turn]["content"]:
                return None
            prompt = [*prompt[:turn], {**prompt[turn], "content": _cut_left(tokenizer, prompt[turn]["content"], over)},
                      *prompt[turn + 1:]]
        else:
            if not prompt:
                return None
            prompt = _cut_left(tokenizer, prompt, over)
        over = len(_prompt_ids(tokenizer, prompt)) - limit
        if over <= 0:
            return prompt
    return None


def limit_prompts(plan: Plan, dataset, tokenizer, split: str):
    """``data.max_prompt_length`` in a generating stage: prompts longer once rendered are cut on the left or
    dropped (``data.prompt_truncation``), counted on screen and in summary.json's ``data_transforms``."""
    limit, side = plan.recipe.data.max_prompt_length, plan.recipe.data.prompt_truncation
    if limit is None or dataset is None or "prompt" not in dataset.column_names:
        return dataset
    prompts, kept, cut = [], [], 0
    for i, prompt in enumerate(dataset["prompt"]):
        short = _prompt_within(tokenizer, prompt, limit) if side == "left" else (
            prompt if len(_prompt_ids(tokenizer, prompt)) <= limit else None)
        if short is None:
            continue
        cut += short is not prompt
        prompts.append(short)
        kept.append(i)
    rows = len(dataset)
    if cut == 0 and len(kept) == rows:
        return dataset
    dataset = dataset.select(kept)
    if cut:
        dataset = dataset.remove_columns("prompt").add_column("prompt", prompts)
    reason = (f"prompts longer than data.max_prompt_length = {limit} tokens: {cut} cut on the left, "
              f"{rows - len(kept)} dropped (too long to cut)" if side == "left" else
              f"prompts longer than data.max_prompt_length = {limit} tokens dropped")
    entry = {"plugin": "posttrain (data.max_prompt_length)", "split": split, "rows_in": rows, "rows_out": len(kept),
             "reason": reason}
    if cut:
        entry["rows_cut"] = cut
    plan.data_log.append(entry)
    print(f"posttrain: {split} data: {reason}", flush=True)
    if not kept:
        raise UserError(f"every {split} prompt is longer than data.max_prompt_length = {limit} tokens",
                        field="data.max_prompt_length", fix="raise it, or use prompt_truncation: left")
    return dataset
