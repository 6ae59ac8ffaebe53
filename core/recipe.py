"""Recipes: YAML files that say which model, data, plugins and training settings a run uses.

Loading is safe (``yaml.SafeLoader``: data only, no Python objects) and strict: every key is
checked against the schema below, with a suggestion for a misspelt one, before anything heavy
is imported. ``docs/recipes.md`` documents every key (a test keeps the two in step).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import Problems, UserError, did_you_mean
from .plugin import check_type

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class LoraSection:
    r: int = _help("LoRA rank.", default=16)
    alpha: int = _help("LoRA scaling numerator (lora_alpha).", default=32)
    dropout: float = _help("Dropout on the LoRA branch.", default=0.05)
    target_modules: Union[str, list[str]] = _help(
        "Modules that get adapters: a list of names, or 'all-linear'.", default="all-linear")
    modules_to_save: Union[list[str], None] = _help("Modules trained in full and saved with the adapter.", default=None)


@dataclass
class QuantizationSection:
    bits: Literal[4, 8] = _help("Load the base model in 4-bit (QLoRA) or 8-bit through bitsandbytes.", default=4)
    quant_type: Literal["nf4", "fp4"] = _help("4-bit data type.", default="nf4")
    double_quant: bool = _help("Quantise the quantisation constants too (4-bit).", default=True)
    compute_dtype: Dtype = _help("Dtype of the 4/8-bit layers' matmuls; 'auto' is model.dtype's compute dtype.",
                                 default="auto")


@dataclass
class ModelSection:
    name_or_path: str = _help("'builtin:NAME', a local folder, or a hub id.")
    revision: Union[str, None] = _help("Hub revision (branch, tag or commit).", default=None)
    dtype: Dtype = _help(
        "Compute dtype: forward passes autocast to it and frozen weights (LoRA/QLoRA base, reference copy, reward "
        "and value models) are stored in it. 'auto': bfloat16 on a GPU that supports it, float16 on other GPUs, "
        "float32 on a CPU. Trained weights stay float32 masters (see trained_dtype).", default="auto")
    trained_dtype: Literal["float32", "bfloat16"] = _help(
        "Dtype the trained weights are stored and updated in. 'float32': master weights with mixed precision "
        "(the default). 'bfloat16': pure bf16 training, half the memory of weights, gradients and optimizer state, "
        "but updates smaller than about 1/256 of a weight are rounded away (a warning says so).", default="float32")
    reference: Union[str, None] = _help(
        "The frozen reference model (preference stage, and online with a KL penalty): a folder, hub id, builtin: "
        "name or stages.NAME. Default: the starting model (with LoRA, the starting model is the base with the "
        "adapter disabled: no second copy; naming another model loads one).", default=None)
    trust_remote_code: bool = _help("Run model code shipped with the checkpoint. Off unless you trust it.",
                                    default=False)
    tokenizer: Union[str, None] = _help(
        "The tokenizer to use when it is not the model's own: a folder, hub id or builtin: name (null: the model's).",
        default=None)
    chat_template: Union[str, None] = _help(
        "The chat template every stage renders conversations with: inline Jinja, or the path of a .jinja file "
        "(relative to the recipe). It is saved with the trained model. null: the tokenizer's own.", default=None)
    pad_token: Union[str, None] = _help(
        "The padding token (a token of the vocabulary, e.g. '<pad>'). null: the tokenizer's own, "
        "else its end-of-sequence token.", default=None)
    attn_implementation: Union[str, None] = _help("e.g. 'sdpa', 'eager', 'flash_attention_2'.", default=None)
    lora: Union[LoraSection, None] = _help("Train a LoRA adapter instead of all weights (null: full fine-tuning).",
                                           default=None)
    quantization: Union[QuantizationSection, None] = _help("Load the base quantised (needs lora).", default=None)


@dataclass
class EvalDataSection:
    source: Union[str, None] = _help("Another source for held-out data (same forms as data.source).", default=None)
    split: Union[str, None] = _help("Split of the held-out source (or of data.source when source is null).",
                                    default=None)
    fraction: float = _help("Without source/split: hold out this fraction of the training data.", default=0.1)
    max_examples: Union[int, None] = _help("Keep at most this many held-out examples.", default=None)


@dataclass
class SourceEntry:
    source: str = _help("'builtin:NAME', a local file, a dataset folder, a hub dataset id or stages.NAME (the forms "
                        "of a single data.source).")
    split: str = _help("Split to read, with an optional slice: train, test[:1000], train[:5%], train[10:20].",
                       default="train")
    subset: Union[str, None] = _help("A hub dataset's configuration (subset) name, e.g. main (load_dataset's second "
                                     "argument); not for local sources.", default=None)
    columns: dict[str, str] = _help("Rename this source's columns: {our_name: their_name}.", default_factory=dict)
    format: Union[str, None] = _help("This source's data format (as data.format; null: detected).", default=None)
    format_options: dict[str, Any] = _help("Options of this source's data format.", default_factory=dict)
    options: dict[str, Any] = _help("Options of a built-in generator (e.g. n, seed).", default_factory=dict)
    fraction: Union[float, None] = _help(
        "Use this fraction of the source's rows (sampled with the recipe's seed); above 1, whole copies then a sample "
        "of the rest (upsampling). null: every row.", default=None)
    count: Union[int, None] = _help(
        "Use this many of the source's rows (sampled with the recipe's seed); above its rows, whole copies then a "
        "sample of the rest. Not with fraction. null: every row.", default=None)


# The data-level keys a list of sources takes in each of its entries instead (their defaults: not set).
PER_SOURCE_KEYS = {"split": "train", "subset": None, "columns": {}, "format": None, "format_options": {},
                   "options": {}, "prefer": None}


@dataclass
class DataSection:
    source: Union[str, list[SourceEntry]] = _help(
        "'builtin:NAME', a local .jsonl/.json/.parquet/.csv file, a dataset folder, or a hub dataset id; or a list of "
        "sources (each a mapping of the keys below), whose rows are concatenated in the order given.")
    split: str = _help("Split to train on, with an optional slice: train[:5%], train[10:20], test[:1000].",
                       default="train")
    subset: Union[str, None] = _help("A hub dataset's configuration (subset) name, e.g. main (load_dataset's second "
                                     "argument); not for local sources.", default=None)
    columns: dict[str, str] = _help("Rename columns: {our_name: their_name}, e.g. {prompt: question}.",
                                    default_factory=dict)
    options: dict[str, Any] = _help("Options of a built-in generator (e.g. n, seed).", default_factory=dict)
    format: Union[str, None] = _help(
        "How to read the source's records: the name of a data-format plugin (`posttrain plugins` lists them: hh, "
        "sharegpt, openai_preference, saferlhf...). null: detected from the columns (ShareGPT `conversations`, "
        "OpenAI's preference JSONL, HH-RLHF's chosen/rejected transcripts), else the stage's columns as they are "
        "(after `columns`).", default=None)
    format_options: dict[str, Any] = _help("Options of the data format (e.g. {prefer: better} for saferlhf).",
                                           default_factory=dict)
    prefer: Union[Literal["safer", "better"], None] = _help(
        "With format: saferlhf, the label that picks the chosen response: safer_response_id or better_response_id "
        "(the same as format_options.prefer).", default=None)
    max_examples: Union[int, None] = _help("Keep at most this many training examples.", default=None)
    system_prompt: Union[str, None] = _help(
        "A system message put before every conversation's first turn (a conversation that starts with a system "
        "message keeps its own). It applies to conversations: with text prompts, set prompt_format: chat.",
        default=None)
    prompt_format: Literal["auto", "chat", "raw"] = _help(
        "How a text prompt reaches the model. 'chat': as a user turn (after system_prompt), rendered with the chat "
        "template. 'raw': the text as it is. 'auto': chat in the stages that train on their own samples (online, "
        "iterative, rejection_sampling) when the model has a chat template, raw elsewhere; a built-in dataset's own "
        "`conversational` option decides for its rows.", default="auto")
    max_prompt_length: Union[int, None] = _help(
        "Generating stages (online, iterative, rejection_sampling): the most tokens a prompt may have once rendered; "
        "longer prompts are cut or dropped (prompt_truncation), and counted. null: no limit.", default=None)
    prompt_truncation: Literal["left", "drop"] = _help(
        "A prompt over max_prompt_length: 'left' keeps its last tokens (a conversation loses the start of its first "
        "non-system turn), 'drop' leaves the row out.", default="left")
    eval: EvalDataSection = _help("Held-out data.", default_factory=EvalDataSection)

    @staticmethod
    def check_raw(raw: dict, where: str) -> None:
        """A list of sources takes split, subset, columns, format, format_options and options in each entry: set at
        the data level too, they are refused (an entry's own would be ambiguous); so is ``eval.split`` without
        ``eval.source`` (a split of which source?)."""
        if not isinstance(raw.get("source"), list):
            return
        for key, default in PER_SOURCE_KEYS.items():
            if key in raw and raw[key] != default:
                what = "format_options: {prefer: ...}" if key == "prefer" else f"{key}: ..."
                raise UserError(f"with a list of sources, {key} is given in each entry of {where}.source",
                                field=f"{where}.{key}",
                                fix=f"move it into the entries that need it (`- {{source: ..., {what}}}`), and remove "
                                    f"{where}.{key}")
        ev = raw.get("eval")
        if isinstance(ev, dict) and ev.get("split") is not None and ev.get("source") is None:
            raise UserError("with a list of sources, eval.split names no source to take that split of",
                            field=f"{where}.eval.split",
                            fix=f"give the held-out source too ({where}.eval.source: ..., {where}.eval.split: "
                                f"{ev['split']}), or hold out a fraction of the mix ({where}.eval.fraction)")


@dataclass
class LmEvalSection:
    tasks: list[str] = _help("lm-evaluation-harness tasks (e.g. gsm8k, ifeval, arc_easy, or your own YAML tasks' "
                             "names).")
    limit: Union[int, float, None] = _help("Examples per task (an int), or a fraction of them; null: all.",
                                           default=None)
    include_path: Union[str, None] = _help("A folder of task YAML files of your own (read against the recipe's "
                                           "folder).", default=None)
    num_fewshot: Union[int, None] = _help("Few-shot examples per prompt; null: each task's default.", default=None)
    batch_size: int = _help("Requests per forward pass.", default=8)
    apply_chat_template: bool = _help("Render prompts with the model's chat template.", default=False)


@dataclass
class EvalSection:
    before: bool = _help("Also evaluate the starting model, to report before/after.", default=True)
    generate: int = _help("Held-out prompts the model answers greedily, scored by the reward plugins (0: off).",
                          default=64)
    max_new_tokens: int = _help("Generation budget for those answers.", default=32)
    lm_eval: Union[LmEvalSection, None] = _help(
        "Standard benchmarks through lm-evaluation-harness on the stage's output (and, with `before`, on the model "
        "the first stage starts from); the results go into summary.json and eval.json.", default=None)


@dataclass
class Recipe:
    model: ModelSection = _help("The model to train.")
    data: DataSection = _help("The training data.")
    name: Union[str, None] = _help("Run name; defaults to the recipe file name.", default=None)
    description: str = _help("One line shown by `posttrain recipes`.", default="")
    stage: str = _help(
        "What kind of training: the name of a stage (sft, reward_model, preference, online, iterative, "
        "rejection_sampling, kto, distillation; `posttrain stages` describes each). A stage may read keys of its own "
        "at the top of the recipe (iterative: rounds, sampling; distillation: teacher).", default="preference")
    seed: int = _help("Seed for data splits, adapter init and training.", default=42)
    output_dir: Union[str, None] = _help("Run directory; defaults to runs/<name>.", default=None)
    plugins: dict[str, Any] = _help(
        "Enabled plugins and their options (default: {dpo: {}} for the preference stage, none online).",
        default_factory=lambda: {"dpo": {}})
    training: dict[str, Any] = _help("Fields of the TRL config (DPOConfig for the preference stage, GRPOConfig online).",
                                     default_factory=dict)
    eval: EvalSection = _help("Held-out evaluation.", default_factory=EvalSection)
    # Not recipe keys: the stage's own options (parsed from the keys the stage declares) and the stage itself,
    # set when the recipe is loaded (posttrain.runner).
    stage_options: Any = field(default=None, metadata={"internal": True})
    kind: Any = field(default=None, repr=False, compare=False, metadata={"internal": True})

    def to_dict(self) -> dict:
        """The recipe as plain data: every key with its value (defaults filled in), the stage's own keys
        included."""
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) if dataclasses.is_dataclass(getattr(self, f.name))
               else copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if not _internal(f)}
        if self.stage_options is not None:
            out.update(dataclasses.asdict(self.stage_options))
        return out


def _internal(f) -> bool:
    return bool(f.metadata.get("internal"))


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 as a float (YAML 1.1 wants 1.0e-4)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _yaml_int_or_float(loader, node):
    text = loader.construct_scalar(node)
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    return float(text.replace("inf", "Inf").lower()) if "inf" in text.lower() else float(text)


_Loader.add_constructor("tag:yaml.org,2002:float", _yaml_int_or_float)


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        raise UserError(f"not valid YAML: {e}", field=where, fix="fix the YAML syntax at the position shown") from None


def _is_section(tp) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) is Union:
        for arg in get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _list_of_sections(tp) -> type | None:
    """The dataclass of a ``list[Section]`` arm of a field's type (``data.source``'s entries), or None."""
    for arm in (get_args(tp) if get_origin(tp) is Union else (tp,)):
        if get_origin(arm) is list and get_args(arm) and dataclasses.is_dataclass(get_args(arm)[0]):
            return get_args(arm)[0]
    return None


def from_data(cls: type, raw: Any, where: str) -> Any:
    """Build a schema dataclass from YAML data, strictly. Every key is checked, and every problem found is
    reported at once (:class:`posttrain.errors.UserErrors`), nested sections' included."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"expected a mapping, got {type(raw).__name__}", field=where or "recipe",
                        fix="write this section as key: value lines")
    fields = {f.name: f for f in dataclasses.fields(cls) if not _internal(f)}
    hints = typing.get_type_hints(cls)
    prefix = f"{where}." if where else ""
    problems = Problems()
    for key in raw:
        if key not in fields:
            with problems.check():
                raise UserError(f"unknown key '{key}'{did_you_mean(key, fields)}", field=f"{prefix}{key}",
                                fix=f"valid keys here: {', '.join(fields)} (see docs/recipes.md)")
    if hasattr(cls, "check_raw"):
        with problems.check():
            cls.check_raw(raw, where)
    values = {}
    for name, f in fields.items():
        path = f"{prefix}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                with problems.check():
                    raise UserError("this key is required", field=path, fix=f"add `{name}:` to the recipe")
            continue
        with problems.check():
            values[name] = _field_value(raw[name], hints[name], name, path)
    problems.raise_any()
    return cls(**values)


def _field_value(value: Any, tp: Any, name: str, path: str) -> Any:
    section = _is_section(tp)
    entries = _list_of_sections(tp)
    if entries is not None and isinstance(value, list):
        if not value:
            raise UserError("an empty list", field=path, fix=f"give at least one entry, or a single {name}")
        problems, out = Problems(), []
        for i, item in enumerate(value):
            with problems.check():
                out.append(from_data(entries, {"source": item} if isinstance(item, str) else item, f"{path}[{i}]"))
        problems.raise_any()
        return out
    if section is not None:
        if value is None and type(None) in get_args(tp):
            return None
        if value is True and type(None) in get_args(tp):  # `lora: true` means the defaults
            return section()
        return from_data(section, value, path)
    return check_type(value, tp, field=path)


def _child(node, part: str, option: str, key: str):
    """``node[part]``; in a list (a pipeline's ``stages``), the entry named ``part`` or at index ``part``."""
    if isinstance(node, list):
        for i, entry in enumerate(node):
            if (isinstance(entry, dict) and entry.get("name") == part) or part == str(i):
                return entry
        names = [e.get("name") for e in node if isinstance(e, dict)]
        raise UserError(f"no entry named '{part}'{did_you_mean(part, names)}", field=f"{option} {key}",
                        fix=f"name a stage ({', '.join(map(str, names))}) or give its index")
    return node.get(part) if isinstance(node, dict) else None


def remove_key(data: dict, key: str) -> None:
    """Apply one ``--unset a.b.c``: remove that key from recipe data, in place (e.g. disable a plugin
    with ``--unset plugins.ref_ema``; in a pipeline ``--unset stages.dpo.plugins.rpo``)."""
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = _child(node, part, "--unset", key)
    if not isinstance(node, dict) or parts[-1] not in node:
        raise UserError(f"the recipe has no key '{key}' to remove", field=f"--unset {key}",
                        fix="give the dotted path of a key the recipe sets, e.g. --unset plugins.ref_ema")
    del node[parts[-1]]


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``--set a.b.c=value`` (value parsed as YAML) to recipe data, in place. In a pipeline,
    ``stages.NAME.`` (or ``stages.INDEX.``) selects a stage: ``--set stages.dpo.plugins.dpo.beta=0.2``."""
    key, sep, raw_value = assignment.partition("=")
    if not sep or not key.strip():
        raise UserError(f"cannot read '--set {assignment}'", field="--set", fix="write --set key.path=value")
    value = parse_yaml(raw_value, f"--set {key}") if raw_value.strip() else None
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = _child(node, part, "--set", key)
        if child is None and isinstance(node, dict):
            child = node[part] = {}
        elif not isinstance(child, (dict, list)):
            raise UserError(f"'{'.'.join(parts[:i + 1])}' is not a section", field=f"--set {key}",
                            fix="set a key inside a section, e.g. --set training.learning_rate=1e-5")
        node = child
    if not isinstance(node, dict):
        raise UserError(f"'{key}' does not name a key", field=f"--set {key}", fix="end the path with a key name")
    node[parts[-1]] = value


# Recipe keys that hold a file or folder path (in a one-stage recipe, and in each entry of `stages`).
PATH_KEYS = (("training", "deepspeed"), ("data", "source"), ("data", "eval", "source"), ("model", "name_or_path"),
             ("model", "reference"), ("model", "tokenizer"), ("model", "chat_template"), ("eval", "lm_eval", "include_path"),
             ("teacher",))  # the distillation stage's teacher model


def is_inline_template(value: str) -> bool:
    """A chat template written in the recipe itself (Jinja), not the path of a file."""
    return "{%" in value or "{{" in value or "\n" in value


def chat_template_text(value: str, field: str = "model.chat_template") -> str:
    """The text of a recipe's ``chat_template``: inline Jinja as it is, else the file it names (UTF-8)."""
    if is_inline_template(value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"chat template file '{value}' does not exist (and the value is not Jinja: it has no {{% or "
                        "{{)", field=field, fix="give the path of a .jinja file (relative to the recipe), or write the "
                                                "template inline")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read chat template file '{value}': {e}", field=field,
                        fix="give a UTF-8 text file") from None


def resolve_relative_paths(data: dict, folder: Path) -> dict:
    """The recipe's own relative paths (a DeepSpeed config, a data file, a model folder) read against the
    folder of the recipe file, when that is where the file is; others are left as written (relative to
    where posttrain runs). A recipe and the files it names can then travel together."""
    def fix_one(node: dict, key: str) -> None:
        value = node.get(key)
        if not isinstance(value, str) or not value or value.startswith(("builtin:", "stages.", "/", "~")) \
                or is_inline_template(value):
            return
        candidate = folder / value
        if candidate.exists():
            node[key] = str(candidate.resolve())

    def fix(section: dict) -> None:
        for keys in PATH_KEYS:
            node = section
            for key in keys[:-1]:
                node = node.get(key) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                continue
            if isinstance(node.get(keys[-1]), list):  # a list of data sources: each entry's own
                entries = node[keys[-1]]
                for i, entry in enumerate(entries):
                    if isinstance(entry, str):
                        entries[i] = {"source": entry}
                        entry = entries[i]
                    if isinstance(entry, dict):
                        fix_one(entry, "source")
                continue
            fix_one(node, keys[-1])

    fix(data)
    for stage in data.get("stages") or []:
        if isinstance(stage, dict):
            fix(stage)
    return data


def load_recipe_data(path: str | Path, overrides: list[str] = (), removals: list[str] = ()) -> dict:
    """A recipe file as data: safe YAML, its relative paths read against its folder, then ``--set`` and
    ``--unset`` (whose paths stay relative to where posttrain runs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file '{path}' does not exist", field="recipe",
                        fix="give the path of a YAML recipe; `posttrain recipes` lists the shipped ones")
    data = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError("a recipe must be a YAML mapping", field=str(path), fix="start the file with `model:`/`data:` keys")
    data = resolve_relative_paths(copy.deepcopy(data), path.resolve().parent)
    for assignment in overrides:
        apply_override(data, assignment)
    for key in removals:
        remove_key(data, key)
    data.setdefault("name", path.stem)
    return data


def schema_keys(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """Every recipe key as (dotted path, type, help), for docs and the docs test."""
    from .plugin import type_name
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if _internal(f):
            continue
        path = f"{prefix}{f.name}"
        section = _is_section(hints[f.name])
        entries = _list_of_sections(hints[f.name])
        out.append((path, "section" if section else type_name(hints[f.name]), f.metadata.get("help", "")))
        if section:
            out.extend(schema_keys(section, path + "."))
        if entries:
            out.extend(schema_keys(entries, path + "[]."))
    return out
