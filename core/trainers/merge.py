"""A LoRA stage's adapter merged into the weights it was trained on (``merged/``), the model a pipeline's
next stage starts from."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..validate import Plan

def export_merged(plan: Plan, stage_dir: Path, dtype: str) -> Path:
    """The LoRA stage's adapter merged into the weights it was trained on, saved to ``merged/`` once.

    The base is loaded as training loaded it; a 4-bit or 8-bit base is dequantised first, so the
    merged weights are the ones the adapter was trained against. Saved in ``dtype`` (float32 by
    default: merging a small LoRA update into bf16 weights rounds it away, as a bf16 optimizer step
    would)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    from ..models import resolve_model_path, torch_dtype

    target = stage_dir / "merged"
    if (target / "config.json").is_file():
        return target
    recipe = plan.recipe
    path = resolve_model_path(recipe.model.name_or_path)
    reward = recipe.kind.head == "reward"  # a sequence classifier (a reward model) rather than a causal LM
    architecture = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "revision": recipe.model.revision,
                              "trust_remote_code": recipe.model.trust_remote_code}
    if reward:
        kwargs["num_labels"] = 1
    q = recipe.model.quantization
    if q is not None:
        kwargs["quantization_config"] = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                                            bnb_4bit_use_double_quant=q.double_quant,
                                                            bnb_4bit_compute_dtype=torch_dtype(dtype))
                                         if q.bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    if reward:
        from ..seams import suppress_new_head_warning

        with suppress_new_head_warning():
            base = architecture.from_pretrained(path, **kwargs)
    else:
        base = architecture.from_pretrained(path, **kwargs)
    if q is not None:
        base = base.dequantize().to(torch_dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(stage_dir / "final")
    if reward:
        base.config.pad_token_id = tokenizer.pad_token_id
    merged = PeftModel.from_pretrained(base, stage_dir / "final").merge_and_unload()
    staging = stage_dir / "merged.partial"
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    for extra in ("reward_stats.json",):
        if (stage_dir / "final" / extra).is_file():
            shutil.copy(stage_dir / "final" / extra, staging / extra)
    staging.rename(target)
    del merged, base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return target

