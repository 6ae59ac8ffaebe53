"""Everything checked about a recipe before a model is loaded (no torch import here)."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import trl_fields
from .data import check_source
from .errors import UserError, did_you_mean
from .models import BUILTIN_MODELS
from .recipe import Recipe, SamplingSection
from .registry import PluginSet, build_plugin_set, required_columns
from .stages import STAGES


@dataclass
class Plan:
    """A validated recipe and what was derived from it."""

    recipe: Recipe
    plugins: PluginSet
    trl_config: dict  # plugin contributions merged with the recipe's `training` section
    data_log: list = field(default_factory=list)  # what the dataset transforms kept and dropped, for summary.json


STAGE_REF = "stages."


def stage_references(value, path: str):
    """Every ``stages.NAME`` string in recipe data, as (dotted path, NAME)."""
    if isinstance(value, str) and value.startswith(STAGE_REF):
        yield path, value[len(STAGE_REF):]
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from stage_references(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from stage_references(item, f"{path}[{i}]")


def check_stage_references(recipe: Recipe, earlier: list[str] | None, later: list[str] = ()) -> None:
    """``stages.NAME`` may name an earlier stage of the same pipeline, wherever a model path goes."""
    data = recipe.to_dict()
    sources = {"source": data["data"]["source"], "eval": {"source": data["data"]["eval"]["source"]}}
    for path, name in stage_references({"model": data["model"], "plugins": data["plugins"], "data": sources}, ""):
        if earlier is None:
            raise UserError(f"'stages.{name}' refers to a pipeline stage, but this recipe has no stages",
                            field=path, fix="give a model folder, hub id or builtin: name, or make this a pipeline "
                                            "(a `stages:` list; see docs/recipes.md)")
        if name in earlier:
            continue
        if name in later:
            raise UserError(f"'stages.{name}' refers to a stage that runs later (or to this one)", field=path,
                            fix=f"refer to an earlier stage: {', '.join(earlier) or 'there is none'}")
        raise UserError(f"'stages.{name}' names no stage{did_you_mean(name, [*earlier, *later])}", field=path,
                        fix=f"earlier stages: {', '.join(earlier) or 'none'}")


def _check_model_source(source: str, field: str) -> None:
    if source.startswith(STAGE_REF):
        return  # a pipeline stage's output, checked by check_stage_references and made by the pipeline
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise UserError(f"unknown built-in model '{name}'{did_you_mean(name, BUILTIN_MODELS)}",
                            field=field, fix=f"built-in models: {', '.join(BUILTIN_MODELS)}")
    elif source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        path = Path(source).expanduser()
        if not path.is_dir():
            raise UserError(f"model folder '{source}' does not exist", field=field,
                            fix="give a folder saved with save_pretrained, a hub id, or a builtin: name")
        if not (path / "config.json").is_file():
            raise UserError(f"'{source}' has no config.json, so it is not a Hugging Face model folder",
                            field=field, fix="point at the folder written by save_pretrained")


def check_model(recipe: Recipe) -> None:
    model = recipe.model
    _check_model_source(model.name_or_path, "model.name_or_path")
    if model.reference is not None:
        _check_model_source(model.reference, "model.reference")
        if recipe.stage not in ("preference", "online"):
            raise UserError(f"the {recipe.stage} stage has no reference model", field="model.reference",
                            fix="remove model.reference")
        if recipe.stage == "online" and model.lora is not None:
            raise UserError("TRL's GRPOTrainer uses the adapter-disabled base as the reference with LoRA and takes no "
                            "separate reference", field="model.reference",
                            fix="remove model.reference (the reference is then the starting model), or train without "
                                "LoRA")
    if model.trained_dtype == "bfloat16" and model.dtype == "float16":
        raise UserError("bfloat16 trained weights cannot be computed in float16", field="model.trained_dtype",
                        fix="use model.dtype: bfloat16 (or auto), or remove trained_dtype for float32 master weights")
    if model.quantization is not None and model.lora is None:
        raise UserError("a quantised base model cannot be trained without an adapter", field="model.quantization",
                        fix="add `lora: {r: 16}` to the model section (QLoRA), or remove quantization")


def check_sampling(recipe: Recipe) -> None:
    """The keys of the stages that sample from the policy (iterative, rejection_sampling)."""
    sampling_stages = ("iterative", "rejection_sampling")
    if recipe.rounds is not None and recipe.stage != "iterative":
        raise UserError(f"rounds applies to the iterative stage, not {recipe.stage}", field="rounds",
                        fix="remove rounds, or use stage: iterative")
    if recipe.rounds is not None and recipe.rounds < 1:
        raise UserError(f"must be at least 1, got {recipe.rounds}", field="rounds", fix="use e.g. rounds: 3")
    s = recipe.sampling
    if s is None:
        return
    if recipe.stage not in sampling_stages:
        raise UserError(f"sampling applies to the {' and '.join(sampling_stages)} stages, not {recipe.stage}",
                        field="sampling", fix="remove the sampling section")
    for name in ("samples", "max_new_tokens", "batch_size"):
        if getattr(s, name) < 1:
            raise UserError(f"must be at least 1, got {getattr(s, name)}", field=f"sampling.{name}",
                            fix="use a positive number")
    if recipe.stage == "iterative" and s.samples < 2:
        raise UserError("a pair needs at least 2 samples per prompt", field="sampling.samples", fix="use e.g. 4")
    if s.prompts is not None and s.prompts < 1:
        raise UserError(f"must be at least 1, got {s.prompts}", field="sampling.prompts", fix="use e.g. 64, or null")
    if s.temperature <= 0 or not 0 < s.top_p <= 1:
        raise UserError("temperature must be > 0 and top_p in (0, 1]", field="sampling", fix="use temperature: 1.0")
    if s.min_score is not None and recipe.stage != "rejection_sampling":
        raise UserError("min_score applies to the rejection_sampling stage", field="sampling.min_score",
                        fix="remove it (iterative pairs are chosen by a pair-selection plugin: best_vs_worst's min_gap)")


def check_training(recipe: Recipe, plugins: PluginSet) -> dict:
    kind = STAGES[recipe.stage]
    if not kind.trains:
        if recipe.training:
            raise UserError(f"the {recipe.stage} stage trains nothing, so it takes no TRL settings",
                            field=f"training.{next(iter(recipe.training))}", fix="remove the training section")
        return {}
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


def validate(recipe: Recipe, earlier_stages: list[str] | None = None, later_stages: list[str] = ()) -> Plan:
    """Every check of a one-stage recipe (or of one stage of a pipeline: ``earlier_stages`` are the names
    ``stages.NAME`` may refer to; None outside a pipeline)."""
    plugins = build_plugin_set(recipe.plugins, recipe.stage)
    check_stage_references(recipe, earlier_stages, later_stages)
    check_model(recipe)
    data = recipe.data
    required = required_columns(plugins, recipe.stage)
    if not data.source.startswith(STAGE_REF):  # an earlier stage's dataset is checked when it exists
        check_source(data.source, columns=data.columns, options=data.options, stage=recipe.stage,
                     where="data.source", required=required, format=data.format, prefer=data.prefer)
    ev = data.eval
    if ev.source and not ev.source.startswith(STAGE_REF):
        check_source(ev.source, columns=data.columns, options={}, stage=recipe.stage, where="data.eval.source",
                     required=required, format=data.format, prefer=data.prefer)
    if not 0 <= ev.fraction < 1:
        raise UserError(f"must be in [0, 1), got {ev.fraction}", field="data.eval.fraction",
                        fix="use e.g. 0.1 to hold out 10% of the training data, or 0 for no held-out set")
    if recipe.eval.generate < 0 or recipe.eval.max_new_tokens < 1:
        raise UserError("eval.generate must be >= 0 and eval.max_new_tokens >= 1", field="eval",
                        fix="use e.g. generate: 64, max_new_tokens: 32")
    check_sampling(recipe)
    if recipe.stage in ("iterative", "rejection_sampling") and recipe.sampling is None:
        recipe.sampling = SamplingSection()
    trl_config = check_training(recipe, plugins)
    if recipe.stage == "online":
        check_online(trl_config, plugins)
        check_generation_engine(trl_config, plugins)
    ds = deepspeed_config(trl_config.get("deepspeed")) if recipe.stage == "iterative" else None
    if ((ds or {}).get("zero_optimization") or {}).get("stage") == 3:
        raise UserError("the iterative stage samples with each process on its own share of the prompts, which "
                        "DeepSpeed ZeRO-3 cannot do (every forward pass needs every process)",
                        field="training.deepspeed", fix="use ZeRO-2 (or plain data parallelism) for iterative DPO")
    return Plan(recipe, plugins, trl_config)


def deepspeed_config(value) -> dict | None:
    """A DeepSpeed config given inline or by the path of its JSON file (None without one)."""
    if value is None:
        return None
    if isinstance(value, str):
        path = Path(value).expanduser()
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except OSError:
            raise UserError(f"DeepSpeed config file '{value}' does not exist", field="training.deepspeed",
                            fix="give the path of a DeepSpeed JSON file (relative to where you run posttrain) or "
                                "write the config inline as a mapping") from None
        except ValueError as e:
            raise UserError(f"DeepSpeed config '{value}' is not valid JSON: {e}", field="training.deepspeed",
                            fix="fix the JSON file") from None
    if not isinstance(value, dict):
        raise UserError("expected a path or a mapping", field="training.deepspeed",
                        fix="give the path of a DeepSpeed JSON file or a mapping")
    return value


def check_generation_engine(trl_config: dict, plugins: PluginSet) -> None:
    """The online stage's generation engine (TRL's ``use_vllm``), checked before anything loads: vLLM
    installed, a CUDA device, no sampler plugin that would replace it, no vLLM option without it."""
    if not trl_config.get("use_vllm"):
        stray = sorted(k for k in trl_config if k.startswith("vllm_"))
        if stray:
            raise UserError(f"{', '.join(stray)} {'has' if len(stray) == 1 else 'have'} no effect without use_vllm: "
                            "true", field=f"training.{stray[0]}",
                            fix="add training.use_vllm: true (on a CUDA machine with vllm installed), or remove it")
        return
    if importlib.util.find_spec("vllm") is None:
        raise UserError("use_vllm needs the vllm package, which is not installed", field="training.use_vllm",
                        fix="pip install vllm (a version matching your torch) on a CUDA machine, or remove "
                            "training.use_vllm to generate with transformers")
    import torch  # only here: vLLM itself imports torch, and the check needs it

    if not torch.cuda.is_available():
        raise UserError("use_vllm needs a CUDA GPU, and this machine has none", field="training.use_vllm",
                        fix="remove training.use_vllm to generate with transformers, or run on a GPU machine")
    samplers = plugins.implementers("posttrain_sample")
    if samplers:
        raise UserError(f"plugin '{samplers[0]}' produces the rollouts (posttrain_sample), so vLLM would never "
                        "generate", field="training.use_vllm",
                        fix=f"remove training.use_vllm, or disable '{samplers[0]}'")
    mode = trl_config.get("vllm_mode", "colocate")
    if mode not in ("colocate", "server"):
        raise UserError(f"vllm_mode must be 'colocate' or 'server', got {mode!r}", field="training.vllm_mode",
                        fix="use colocate (vLLM shares this GPU) or server (a `trl vllm-serve` process)")


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
    critic = bool(plugins.implementers("posttrain_critic"))
    if batch["group"] is None or batch["group"] < (1 if critic else 2):
        raise UserError(f"num_generations must be at least 2 (completions per prompt: the group is the baseline) "
                        f"without a critic, got {batch['group']}", field="training.num_generations",
                        fix="use e.g. num_generations: 4, or enable a critic (plugins: critic, gae) for one "
                            "completion per prompt")
    if batch["group"] == 1 and batch["generation_batch"] < 2:
        raise UserError("one completion per prompt needs a generation batch of at least 2 completions",
                        field="training.per_device_train_batch_size", fix="use per_device_train_batch_size >= 2")
    estimator = plugins.implementers("posttrain_advantage_estimate")
    uses_critic = [n for n in estimator if getattr(plugins.by_name[n], "uses_critic", False)]
    if uses_critic and not critic:
        raise UserError(f"the advantage estimator '{uses_critic[0]}' learns with a critic, and no plugin provides one",
                        field="plugins", fix="enable the critic plugin: `critic: {}` (LoRA on the policy's base) or "
                                             "`critic: {model: <reward model>}`")
    if critic and not uses_critic:
        raise UserError(f"the critic needs an advantage estimator that uses its values; "
                        f"'{estimator[0] if estimator else 'none'}' does not", field="plugins.critic",
                        fix="use the gae estimator with the critic (plugins: {critic: {}, gae: {}})")
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
