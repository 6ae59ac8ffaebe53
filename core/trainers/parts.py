"""What a stage's trainer is built from: the data (loaded, checked, transformed by the plugins), the
precision, the TRL config, the tokenizer, the model and the callbacks; and what every stage does to the
trainer TRL built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.trainer_callback import ProgressCallback

from ..errors import UserError
from ..models import Precision, cast_trained_weights
from ..types import Transformed
from ..validate import Plan
from .callbacks import Progress, StopCallback, trainer_callbacks
from .config import build_config
from .prompts import limit_prompts, run_prompt_form


def transform(plan: Plan, dataset, split: str):
    """Pass a split through the ``posttrain_transform_dataset`` chain."""
    if dataset is None:
        return None
    def record(plugin, before, after, reason):
        entry = {"plugin": plugin, "split": split, "rows_in": len(before), "rows_out": len(after)}
        if reason:
            entry["reason"] = reason
        plan.data_log.append(entry)
        why = f": {reason}" if reason else ""
        print(f"posttrain: {plugin} kept {entry['rows_out']} of {entry['rows_in']} {split} rows "
              f"(dropped {entry['rows_in'] - entry['rows_out']}{why})", flush=True)

    def unwrap(result):
        return (result.dataset, result.reason) if isinstance(result, Transformed) else (result, None)

    out, last = plan.plugins.chain("posttrain_transform_dataset", "dataset", dataset, on_step=record, unwrap=unwrap,
                                   split=split, stage=plan.recipe.stage)
    if len(out) == 0 and last is not None:
        raise UserError(f"the {split} data is empty after plugin '{last}' transformed it", field=f"plugins.{last}",
                        fix=f"relax the options of '{last}' or use more data")
    return out


def load_data(plan: Plan):
    """Training and held-out splits, loaded, checked and transformed by the plugins."""
    from ..data import load_splits, source_counts
    from ..plugin_set import required_columns

    plan.data_sources = []
    train, heldout, log = load_splits(plan.recipe, required_columns(plan.plugins, plan.recipe.stage), plan.plugins,
                                      run_prompt_form(plan), plan.data_sources)
    for entry in plan.data_sources if isinstance(plan.recipe.data.source, list) else ():
        print(f"posttrain: data source {source_counts(entry)}", flush=True)
    for entry in log:
        plan.data_log.append(entry)
        dropped = entry["rows_in"] - entry["rows_out"]
        what = f"kept {entry['rows_out']} of {entry['rows_in']} {entry['split']} rows: " if dropped else \
            f"{entry['split']} data: "
        print(f"posttrain: {what}{entry['reason']}", flush=True)
    train, heldout = transform(plan, train, "train"), transform(plan, heldout, "eval")
    plan.data_sizes = {"train": len(train), "eval": len(heldout) if heldout is not None else None}
    if len(train) == 0:
        raise UserError("the training data is empty", field="data.source", fix="point data.source at some examples")
    if heldout is not None and len(heldout) == 0:
        raise UserError("the held-out data is empty", field="data.eval",
                        fix="use a larger data.eval.fraction, another data.eval source/split, or fraction: 0 for none")
    from ..checkpoints import data_checked

    data_checked()  # an earlier run this one replaces (--overwrite) is deleted only now
    return train, heldout


@dataclass
class Parts:
    """What a stage's trainer is built from."""

    train: Any  # the training split, loaded, checked and transformed by the plugins
    heldout: Any  # the held-out split, or None
    precision: Precision
    config: Any  # the TRL config
    path: str  # the starting model's folder (or hub id)
    tokenizer: Any
    model: Any  # the policy (or the reward model), float32 masters, 4/8-bit base when asked
    peft_config: Any  # the LoRA config TRL applies, or None
    callbacks: list  # posttrain's metric writer and the plugins' callbacks


def trainer_parts(plan: Plan, run_dir: Path, config_cls=None, *, config=None, reward_head: bool = False) -> Parts:
    """The data, precision, TRL config (``config_cls`` built from the plan, or a ready ``config(precision)``),
    tokenizer, model and callbacks every trainer starts from."""
    from ..models import load_model, load_tokenizer, resolve_model_path, run_precision

    recipe = plan.recipe
    train, heldout = load_data(plan)
    precision = run_precision(recipe)
    trl_config = config(precision) if config is not None else build_config(config_cls, plan, run_dir, precision)
    path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(recipe, path)
    train = limit_prompts(plan, train, tokenizer, "train")
    heldout = limit_prompts(plan, heldout, tokenizer, "eval")
    model, peft_config = load_model(recipe, path, precision, reward_head=reward_head)
    return Parts(train, heldout, precision, trl_config, path, tokenizer, model, peft_config,
                 trainer_callbacks(plan, run_dir))


def finish_trainer(trainer, precision: Precision):
    """What every stage does to its trainer once TRL has built it: trained weights in the trained
    dtype (float32 masters; DeepSpeed keeps its own), and our progress bar instead of printed dicts."""
    if not trainer.is_deepspeed_enabled:
        cast_trained_weights(trainer.model, precision)
    trainer.precision = precision
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(Progress)
    trainer.add_callback(StopCallback(trainer))
    return trainer


def token_lengths(dataset, column: str):
    """The number of tokens in each row of a tokenised column (a numpy array), read from Arrow without building
    Python lists."""
    import pyarrow.compute as pc

    table = dataset.select_columns([column]).with_format("arrow")[:]
    return pc.list_value_length(table[column]).to_numpy(zero_copy_only=False)
