"""Everything checked about a recipe before a model is loaded (no torch import here).

:func:`validate` checks one stage's recipe against its stage's declaration (``recipe.kind``, a
:class:`posttrain.stage.Stage`): the plugins, the model section, the data, the TRL settings, then the
stage's own checks. It knows no stage by name: what differs between stages is in their declarations.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import trl_fields
from .data import PromptForm, check_mix, check_source, format_options, prompt_form
from .errors import Problems, UserError, did_you_mean
from .models import BUILTIN_MODELS, has_chat_template
from .process import world_size
from .recipe import Recipe, chat_template_text
from .plugin_set import PluginSet, build_plugin_set, required_columns
from .stage import Stage
from .stage_refs import STAGE_REF, references


@dataclass
class Plan:
    """A validated recipe (one stage) and what was derived from it."""

    recipe: Recipe
    plugins: PluginSet
    trl_config: dict  # plugin contributions merged with the recipe's `training` section
    data_log: list = field(default_factory=list)  # what the dataset transforms kept and dropped, for summary.json
    data_notes: list = field(default_factory=list)  # what validation found in the data: repairs, detected formats
    data_sizes: dict = field(default_factory=dict)  # rows per split given to the trainer, to count what TRL drops
    prompt_form: PromptForm | None = None  # how prompts reach the model (decided again when the run loads the data)
    data_sources: list = field(default_factory=list)  # each training source's rows read and used, for summary.json

    @property
    def stage(self) -> Stage:
        return self.recipe.kind

    @property
    def options(self):
        """The stage's own options (``Stage.Options``)."""
        return self.recipe.stage_options


def check_stage_references(recipe: Recipe, earlier: list[str] | None, later: list[str] = ()) -> None:
    """``stages.NAME`` may name an earlier stage of the same pipeline, wherever a model path goes."""
    data = recipe.to_dict()
    source = data["data"]["source"]
    if isinstance(source, list):  # a list of sources: each entry's
        source = [{"source": entry["source"]} for entry in source]
    sources = {"source": source, "eval": {"source": data["data"]["eval"]["source"]}}
    for path, name in references({"model": data["model"], "plugins": data["plugins"], "data": sources}, ""):
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


def check_reward_columns(stage: Stage, plugins: PluginSet, required: dict[str, str]) -> None:
    """A reward source's column must be one the stage passes to reward sources: the online stage gives them the
    prompt and the completion as arguments of their own, so a verifier reading its gold answer from a column
    of that name would abstain on every completion, and training would learn nothing."""
    sources = set(plugins.implementers("posttrain_reward"))
    for column, plugin in required.items():
        if column in stage.reward_arguments and plugin in sources:
            raise UserError(f"plugin '{plugin}' reads column '{column}', but the {stage.name} stage passes "
                            f"{', '.join(stage.reward_arguments)} to reward sources as their own arguments, not as "
                            "columns: every completion would go unscored", field=f"plugins.{plugin}",
                            fix=f"keep the gold answers in a column of another name (e.g. `data: {{columns: "
                                f"{{ground_truth: {column}}}}}` and the plugin's default column)")


def check_chat_template(value: str) -> None:
    """A recipe's chat template: readable, and Jinja that compiles (a syntax error named by its line)."""
    import jinja2

    text = chat_template_text(value)
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the chat template is not valid Jinja: {e.message} (line {e.lineno})",
                        field="model.chat_template", fix="fix the template (it is rendered as transformers renders "
                                                         "chat templates: jinja2)") from None


def _check_tokenizer_source(source: str) -> None:
    if source.startswith(STAGE_REF):
        return
    if source.startswith("builtin:"):
        _check_model_source(source, "model.tokenizer")
    elif source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        path = Path(source).expanduser()
        if not path.is_dir() or not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json",
                                                                               "tokenizer.model", "vocab.json")):
            raise UserError(f"'{source}' is not a tokenizer folder (no tokenizer.json or tokenizer_config.json)",
                            field="model.tokenizer", fix="point at a folder written by save_pretrained, a hub id, or "
                                                          "a builtin: name")


def check_prompt_options(recipe: Recipe, form: PromptForm) -> None:
    """``data.system_prompt``, ``prompt_format`` and ``max_prompt_length`` against the stage and the model."""
    data, stage = recipe.data, recipe.kind
    if data.prompt_format == "chat" and has_chat_template(recipe.model) is False:
        raise UserError("prompt_format: chat renders prompts with the chat template, and this model's tokenizer has "
                        "none", field="data.prompt_format",
                        fix="give one with model.chat_template (inline Jinja or a .jinja file), or use "
                            "prompt_format: raw")
    if data.system_prompt is not None and data.prompt_format == "raw":
        raise UserError("a system prompt is a message of a conversation, and prompt_format: raw keeps text prompts "
                        "as text", field="data.system_prompt",
                        fix="use prompt_format: chat (text prompts become a user turn after the system prompt), or "
                            "remove data.system_prompt")
    if data.system_prompt is not None and not form.chat and has_chat_template(recipe.model) is False:
        raise UserError("a system prompt is rendered by the chat template, and this model's tokenizer has none",
                        field="data.system_prompt", fix="give one with model.chat_template, or remove "
                                                        "data.system_prompt")
    if data.max_prompt_length is not None:
        if not stage.generates:
            raise UserError(f"max_prompt_length applies to the stages that generate from prompts (online, iterative, "
                            f"rejection_sampling); the {stage.name} stage truncates at training.max_length",
                            field="data.max_prompt_length", fix="remove it (set training.max_length instead)")
        if data.max_prompt_length < 1:
            raise UserError(f"must be at least 1, got {data.max_prompt_length}", field="data.max_prompt_length",
                            fix="give the most tokens a rendered prompt may have, e.g. 512")


def check_model(recipe: Recipe) -> None:
    model = recipe.model
    _check_model_source(model.name_or_path, "model.name_or_path")
    if model.tokenizer is not None:
        _check_tokenizer_source(model.tokenizer)
    if model.chat_template is not None:
        check_chat_template(model.chat_template)
    if model.reference is not None:
        _check_model_source(model.reference, "model.reference")
        if not recipe.kind.has_reference:
            raise UserError(f"the {recipe.stage} stage has no reference model", field="model.reference",
                            fix="remove model.reference")
    if model.trained_dtype == "bfloat16" and model.dtype == "float16":
        raise UserError("bfloat16 trained weights cannot be computed in float16", field="model.trained_dtype",
                        fix="use model.dtype: bfloat16 (or auto), or remove trained_dtype for float32 master weights")
    if model.quantization is not None and model.lora is None:
        raise UserError("a quantised base model cannot be trained without an adapter", field="model.quantization",
                        fix="add `lora: {r: 16}` to the model section (QLoRA), or remove quantization")


def check_training(recipe: Recipe, plugins: PluginSet) -> dict:
    kind = recipe.kind
    if not kind.trains:
        if recipe.training:
            raise UserError(f"the {recipe.stage} stage trains nothing, so it takes no TRL settings",
                            field=f"training.{next(iter(recipe.training))}", fix="remove the training section")
        return {}
    fields = trl_fields.config_fields(kind.config)
    problems = Problems()  # every key is checked: all their problems are reported at once
    for key, value in recipe.training.items():
        with problems.check():
            _check_training_key(kind, fields, key, value)
    problems.raise_any()
    return _checked_training(recipe, plugins, fields)


def _check_training_key(kind: Stage, fields: dict, key: str, value) -> None:
    """One key of the recipe's ``training`` section against the stage's TRL config."""
    cls_name = kind.config.name
    managed, renamed = kind.managed, kind.renamed
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


def _checked_training(recipe: Recipe, plugins: PluginSet | None, fields: dict) -> dict:
    """The TRL values of a recipe whose keys each passed: the plugins' contributions merged in, and the checks
    that read several of them."""
    cls_name = recipe.kind.config.name
    if recipe.training.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        raise UserError("use_liger_kernel needs the liger-kernel package", field="training.use_liger_kernel",
                        fix="pip install 'posttrain[gpu]' (liger-kernel) on a CUDA machine, or remove the key")
    contributed = plugins.merged("posttrain_trl_config", "TRL config field",
                                 stage=recipe.stage, recipe=recipe.to_dict()) if plugins is not None else {}
    for key, value in contributed.items():
        if key not in fields:
            raise UserError(f"a plugin sets unknown {cls_name} field '{key}'", field="plugins",
                            fix="report this to the plugin's author")
        if key in recipe.training and recipe.training[key] != value:
            raise UserError(f"the recipe sets {key}={recipe.training[key]!r} but an enabled plugin sets {value!r}",
                            field=f"training.{key}", fix=f"remove training.{key} or change the plugin's options")
    values = {**contributed, **recipe.training}
    check_trackers(values.get("report_to"))
    check_hub(values)
    check_evaluation(recipe, values)
    return values


# The trackers transformers reports to (``training.report_to``): name -> (the modules it needs, every one of
# them; the first name per entry of alternatives), and how to install them. What transformers' own availability
# checks (transformers.integrations) look for, read with find_spec so that no tracker (nor torch) is imported.
TRACKERS = {
    "tensorboard": ((("tensorboard", "tensorboardX"),), "pip install 'posttrain[tensorboard]' (TensorBoard)"),
    "wandb": ((("wandb",),), "pip install wandb"),
    "mlflow": ((("mlflow",),), "pip install mlflow"),
    "comet_ml": ((("comet_ml",),), "pip install comet-ml"),
    "clearml": ((("clearml",),), "pip install clearml"),
    "trackio": ((("trackio",),), "pip install trackio"),
    "swanlab": ((("swanlab",),), "pip install swanlab"),
    "dvclive": ((("dvclive",),), "pip install dvclive"),
    "neptune": ((("neptune", "neptune-client"),), "pip install neptune"),
    "codecarbon": ((("codecarbon",),), "pip install codecarbon"),
    "dagshub": ((("dagshub",), ("mlflow",)), "pip install dagshub mlflow"),
    "azure_ml": ((("azureml.core.run",),), "pip install azureml-sdk"),
    "flyte": ((("flytekit",),), "pip install flytekit"),
    "kubeflow": ((), ""),  # no package: transformers reports to it inside a Kubeflow TrainJob
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a dotted name whose parent package is missing
        return False


def check_trackers(report_to) -> None:
    """Every tracker of ``training.report_to`` is one transformers knows, and its package is installed."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if len(names) > 1 and {"none", "all"} & set(names):
        raise UserError(f"{'none' if 'none' in names else 'all'} stands alone in report_to (transformers refuses it "
                        f"in a list: {names})", field="training.report_to",
                        fix="give none, all (every installed tracker), or a list of trackers")
    for name in names:
        if name in ("none", "all"):  # all: the trackers that are installed
            continue
        if name not in TRACKERS:
            raise UserError(f"transformers reports to no tracker called {name!r}{did_you_mean(name, TRACKERS)}",
                            field="training.report_to",
                            fix=f"use none, all (every installed tracker) or some of: {', '.join(TRACKERS)}")
        needs, install = TRACKERS[name]
        for alternatives in needs:
            if not any(_installed(module) for module in alternatives):
                raise UserError(f"report_to names {name}, whose package ({alternatives[0]}) is not installed",
                                field="training.report_to",
                                fix=f"{install}, or remove {name} from training.report_to")
        if name == "kubeflow" and not os.environ.get("KUBEFLOW_TRAINER_SERVER_URL"):
            raise UserError("report_to names kubeflow outside a Kubeflow TrainJob (KUBEFLOW_TRAINER_SERVER_URL is "
                            "not set)", field="training.report_to",
                            fix="remove kubeflow (transformers adds it by itself inside a TrainJob)")


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set (to a value huggingface_hub reads as true)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def check_hub(values: dict) -> None:
    if values.get("push_to_hub") and hub_offline():
        raise UserError("push_to_hub needs the hub; HF_HUB_OFFLINE is set", field="training.push_to_hub",
                        fix="unset HF_HUB_OFFLINE (and log in: `hf auth login` or HF_TOKEN), or remove "
                            "training.push_to_hub (the model is in the run directory's final/)")


def check_evaluation(recipe: Recipe, values: dict) -> None:
    """Evaluation during training (``eval_strategy``, ``eval_on_start``) evaluates the held-out data."""
    strategy = values.get("eval_strategy")
    ev = recipe.data.eval
    if (strategy in (None, "no") and not values.get("eval_on_start")) or ev.source or ev.split or ev.fraction > 0:
        return
    key = "eval_on_start" if strategy in (None, "no") else "eval_strategy"
    raise UserError(f"{key} evaluates the held-out data during training, and this recipe holds none out",
                    field="data.eval",
                    fix=f"hold some out (data.eval.fraction: 0.1, or a data.eval source/split), or remove "
                        f"training.{key}")


def validate(recipe: Recipe, earlier_stages: list[str] | None = None, later_stages: list[str] = ()) -> Plan:
    """Every check of a one-stage recipe (or of one stage of a pipeline: ``earlier_stages`` are the names
    ``stages.NAME`` may refer to; None outside a pipeline). ``recipe.kind`` is its stage."""
    stage = recipe.kind
    problems = Problems()  # independent checks: every problem they find is reported at once
    plugins = None
    with problems.check():
        plugins = build_plugin_set(recipe.plugins, stage)
    with problems.check():
        check_stage_references(recipe, earlier_stages, later_stages)
    with problems.check():
        check_model(recipe)
    data = recipe.data
    form = prompt_form(recipe, has_chat_template(recipe.model))
    with problems.check():
        check_prompt_options(recipe, form)
    with problems.check():
        if not 0 <= data.eval.fraction < 1:
            raise UserError(f"must be in [0, 1), got {data.eval.fraction}", field="data.eval.fraction",
                            fix="use e.g. 0.1 to hold out 10% of the training data, or 0 for no held-out set")
    with problems.check():
        if recipe.eval.generate < 0 or recipe.eval.max_new_tokens < 1:
            raise UserError("eval.generate must be >= 0 and eval.max_new_tokens >= 1", field="eval",
                            fix="use e.g. generate: 64, max_new_tokens: 32")
    trl_config = {}
    with problems.check():
        trl_config = check_training(recipe, plugins)
    if plugins is None:  # the data checks need the plugins' columns
        problems.raise_any()
    with problems.check():
        notes = check_data(recipe, plugins, form)
    problems.raise_any()
    plan = Plan(recipe, plugins, trl_config, data_notes=list(dict.fromkeys(notes)), prompt_form=form)
    check_engine(plan)
    stage.check(plan)
    from . import lengths

    plan.data_notes += lengths.check_lengths(plan)  # the rows TRL would drop at training.max_length
    return plan


def check_data(recipe: Recipe, plugins: PluginSet, form: PromptForm) -> list[str]:
    """The data sources, every row of a local one: notes on what was found and repaired, or a user error."""
    stage, data = recipe.kind, recipe.data
    required = required_columns(plugins, recipe.stage)
    check_reward_columns(stage, plugins, required)
    fmt_options = format_options(data)
    notes: list[str] = []
    common = dict(columns=data.columns, stage=stage, required=required, format=data.format,
                  format_options=fmt_options, plugins=plugins, form=form)
    mix = isinstance(data.source, list)
    if mix:
        notes += check_mix(data, stage=stage, required=required, plugins=plugins, form=form)
    elif not data.source.startswith(STAGE_REF):  # an earlier stage's dataset is checked when it exists
        notes += check_source(data.source, options=data.options, where="data.source", split=data.split,
                              subset=data.subset, **common)
    ev = data.eval
    if ev.source and not ev.source.startswith(STAGE_REF):
        if mix:  # read as it is: the columns and format are each entry's
            common.update(columns={}, format=None, format_options={})
        notes += check_source(ev.source, options={}, where="data.eval.source", split=ev.split, **common)
    elif ev.split and not mix and not data.source.startswith(STAGE_REF):
        notes += check_source(data.source, options=data.options, where="data.eval.split", split=ev.split,
                              subset=data.subset, **common)
    return notes


ZERO_STAGES = (0, 1, 2, 3)


def check_engine(plan: Plan) -> None:
    """What DeepSpeed would refuse when the first model loads, said before: its ZeRO stage, and its batch
    sizes against the recipe's and the launch's number of processes (``"auto"`` takes the recipe's)."""
    ds = deepspeed_config(plan.trl_config.get("deepspeed"))
    if ds is None:
        return
    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict) or zero.get("stage", 0) not in ZERO_STAGES:
        raise UserError(f"zero_optimization.stage must be one of {', '.join(map(str, ZERO_STAGES))}, got "
                        f"{zero.get('stage') if isinstance(zero, dict) else zero!r}", field="training.deepspeed",
                        fix="use 2 (optimizer state and gradients sharded) or 3 (the weights too)")
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is False:
        raise UserError("with stage3_gather_16bit_weights_on_model_save false, final/ would hold ZeRO shards, "
                        "which the next stage, the merge and `transformers` cannot load",
                        field="training.deepspeed",
                        fix="remove the key (posttrain gathers the final weights from the shards into final/)")
    defaults = trl_fields.config_defaults(plan.recipe.kind.config)
    value = lambda key: plan.trl_config.get(key, defaults.get(key))  # noqa: E731
    micro, accumulation = value("per_device_train_batch_size"), value("gradient_accumulation_steps")
    processes = world_size()
    for key, ours, name in (("train_micro_batch_size_per_gpu", micro, "per_device_train_batch_size"),
                            ("gradient_accumulation_steps", accumulation, "gradient_accumulation_steps")):
        theirs = ds.get(key, "auto")
        if theirs != "auto" and theirs != ours:
            raise UserError(f"the DeepSpeed config's {key} is {theirs!r} but training.{name} is {ours}",
                            field="training.deepspeed",
                            fix=f"set {key} to \"auto\" in the DeepSpeed config (posttrain fills it in), or make the "
                                "two equal")
    total = ds.get("train_batch_size", "auto")
    if total != "auto" and isinstance(micro, int) and isinstance(accumulation, int):
        per_process = micro * accumulation
        launched = processes > 1
        if (launched and total != per_process * processes) or not isinstance(total, int) or total % per_process:
            where = f"this launch's {processes} processes" if launched else "a whole number of processes"
            raise UserError(f"the DeepSpeed config's train_batch_size is {total!r}, which is not "
                            f"per_device_train_batch_size {micro} x gradient_accumulation_steps {accumulation} x "
                            f"{where}", field="training.deepspeed",
                            fix="set train_batch_size to \"auto\" in the DeepSpeed config (posttrain computes it from "
                                "the recipe and the launch)")


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


def online_batch(trl_config: dict, defaults: dict) -> dict:
    """GRPOConfig's batch arithmetic (``defaults``: GRPOConfig's, read from TRL's source): completions per
    device and micro-batch, per prompt (the group) and per generation batch, over every process."""
    value = lambda key: trl_config.get(key, defaults.get(key))  # noqa: E731
    per_device, accumulation = value("per_device_train_batch_size"), value("gradient_accumulation_steps")
    group = value("num_generations")
    steps = value("steps_per_generation")
    generation = value("generation_batch_size")
    if generation is None:
        steps = steps or accumulation
        generation = per_device * world_size() * steps
    return {"per_device": per_device, "group": group, "generation_batch": generation}
