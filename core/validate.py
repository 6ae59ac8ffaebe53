"""Everything checked about a recipe before a model is loaded (no torch import here)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from . import trl_fields
from .data import check_source
from .errors import UserError, did_you_mean
from .models import BUILTIN_MODELS
from .recipe import Recipe
from .registry import PluginSet, build_plugin_set, required_columns
from .stages import STAGES


@dataclass
class Plan:
    """A validated recipe and what was derived from it."""

    recipe: Recipe
    plugins: PluginSet
    trl_config: dict  # plugin contributions merged with the recipe's `training` section


def check_model(recipe: Recipe) -> None:
    model = recipe.model
    source = model.name_or_path
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise UserError(f"unknown built-in model '{name}'{did_you_mean(name, BUILTIN_MODELS)}",
                            field="model.name_or_path", fix=f"built-in models: {', '.join(BUILTIN_MODELS)}")
    elif source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        path = Path(source).expanduser()
        if not path.is_dir():
            raise UserError(f"model folder '{source}' does not exist", field="model.name_or_path",
                            fix="give a folder saved with save_pretrained, a hub id, or a builtin: name")
        if not (path / "config.json").is_file():
            raise UserError(f"'{source}' has no config.json, so it is not a Hugging Face model folder",
                            field="model.name_or_path", fix="point at the folder written by save_pretrained")
    if model.trained_dtype == "bfloat16" and model.dtype == "float16":
        raise UserError("bfloat16 trained weights cannot be computed in float16", field="model.trained_dtype",
                        fix="use model.dtype: bfloat16 (or auto), or remove trained_dtype for float32 master weights")
    if model.quantization is not None and model.lora is None:
        raise UserError("a quantised base model cannot be trained without an adapter", field="model.quantization",
                        fix="add `lora: {r: 16}` to the model section (QLoRA), or remove quantization")


def check_training(recipe: Recipe, plugins: PluginSet) -> dict:
    kind = STAGES[recipe.stage]
    fields = trl_fields.config_fields(recipe.stage)
    cls_name = kind.config_class
    managed, renamed = kind.managed, kind.renamed
    for key, value in recipe.training.items():
        if key in managed:
            raise UserError(f"'{key}' is not set here: {managed[key]}", field=f"training.{key}",
                            fix=f"remove training.{key}")
        if key not in fields and key in renamed:
            raise UserError(f"{cls_name} has no field '{key}'", field=f"training.{key}", fix=renamed[key])
        if key not in fields:
            raise UserError(f"{cls_name} has no field '{key}'{did_you_mean(key, fields)}", field=f"training.{key}",
                            fix=f"use a {cls_name} field (see TRL's documentation of {cls_name})")
        if key == "deepspeed" and isinstance(value, str) and not Path(value).expanduser().is_file():
            raise UserError(f"DeepSpeed config file '{value}' does not exist", field="training.deepspeed",
                            fix="give the path of a DeepSpeed JSON file (relative to where you run posttrain) "
                                "or write the config inline as a mapping")
        if not trl_fields.value_matches(fields[key], value):
            raise UserError(f"expected {fields[key]}, got {value!r}", field=f"training.{key}",
                            fix=f"give training.{key} a value of type {fields[key]}")
    if recipe.training.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        raise UserError("use_liger_kernel needs the liger-kernel package", field="training.use_liger_kernel",
                        fix="pip install 'posttrain[gpu]' (liger-kernel) on a CUDA machine, or remove the key")
    contributed = plugins.merged("posttrain_trl_config", "TRL config field",
                                 stage=recipe.stage, recipe=recipe.to_dict())
    for key, value in contributed.items():
        if key not in fields:
            raise UserError(f"a plugin sets unknown {cls_name} field '{key}'", field="plugins",
                            fix="report this to the plugin's author")
        if key in recipe.training and recipe.training[key] != value:
            raise UserError(f"the recipe sets {key}={recipe.training[key]!r} but an enabled plugin sets {value!r}",
                            field=f"training.{key}", fix=f"remove training.{key} or change the plugin's options")
    return {**contributed, **recipe.training}


def validate(recipe: Recipe) -> Plan:
    plugins = build_plugin_set(recipe.plugins, recipe.stage)
    check_model(recipe)
    data = recipe.data
    required = required_columns(plugins, recipe.stage)
    check_source(data.source, columns=data.columns, options=data.options, stage=recipe.stage, where="data.source",
                 required=required)
    ev = data.eval
    if ev.source:
        check_source(ev.source, columns=data.columns, options={}, stage=recipe.stage, where="data.eval.source",
                     required=required)
    if not 0 <= ev.fraction < 1:
        raise UserError(f"must be in [0, 1), got {ev.fraction}", field="data.eval.fraction",
                        fix="use e.g. 0.1 to hold out 10% of the training data, or 0 for no held-out set")
    if recipe.eval.generate < 0 or recipe.eval.max_new_tokens < 1:
        raise UserError("eval.generate must be >= 0 and eval.max_new_tokens >= 1", field="eval",
                        fix="use e.g. generate: 64, max_new_tokens: 32")
    trl_config = check_training(recipe, plugins)
    if recipe.stage == "online":
        check_online(trl_config, plugins)
    return Plan(recipe, plugins, trl_config)


def world_size() -> int:
    """Processes of the launch this runs in (torchrun / accelerate / deepspeed set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def online_batch(trl_config: dict) -> dict:
    """The online stage's batch arithmetic, as GRPOConfig derives it (defaults read from TRL's source)."""
    defaults = trl_fields.config_defaults("online")
    value = lambda key: trl_config.get(key, defaults.get(key))  # noqa: E731
    per_device, accumulation = value("per_device_train_batch_size"), value("gradient_accumulation_steps")
    group = value("num_generations")
    steps = value("steps_per_generation")
    generation = value("generation_batch_size")
    if generation is None:
        steps = steps or accumulation
        generation = per_device * world_size() * steps
    return {"per_device": per_device, "group": group, "generation_batch": generation}


def check_online(trl_config: dict, plugins: PluginSet) -> None:
    """What GRPOConfig and GRPOTrainer would refuse, said in recipe terms before anything loads."""
    batch = online_batch(trl_config)
    if batch["group"] is None or batch["group"] < 2:
        raise UserError(f"num_generations must be at least 2 (completions per prompt), got {batch['group']}",
                        field="training.num_generations", fix="use e.g. num_generations: 4")
    if batch["generation_batch"] % batch["group"]:
        raise UserError(
            f"a generation batch of {batch['generation_batch']} completions (per_device_train_batch_size "
            f"{batch['per_device']} x {world_size()} process(es) x steps_per_generation) does not split into groups "
            f"of num_generations={batch['group']}", field="training.num_generations",
            fix="make per_device_train_batch_size x processes x gradient_accumulation_steps a multiple of "
                "num_generations, or let the large_batch plugin derive them from prompts_per_update")
    beta = trl_config.get("beta", trl_fields.config_defaults("online").get("beta"))
    wanting = [name for name, needed in plugins.call_each("posttrain_reference_needed", stage="online") if needed]
    if wanting and not beta:
        raise UserError(
            f"plugin '{wanting[0]}' needs a reference model, which the online stage only has with a KL penalty "
            f"(training.beta is {beta})", field="training.beta",
            fix="set training.beta > 0 (e.g. 0.05, Tülu 3's RLVR value), or remove the plugin")
