"""From a recipe to estimates: its stages (:class:`StageInput`, one, or a pipeline's with ``stages.NAME``
model references resolved), each stage's :class:`~.setup.Setup` (:func:`setup_from_recipe`: the recipe's
model section, its TRL config values as ``posttrain validate`` checks them, the stage's
``memory`` facts, the other models it loads), and :func:`estimate_recipe` / :func:`estimate_data`,
which estimate every stage and, where one does not fit, try the changes of :mod:`.suggest`."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import UserError
from ..validate import deepspeed_config
from .constants import KBIT_UPCASTS_UNQUANTISED
from .memory import Estimate, add_vllm_share, compute
from .parameters import optimizer_spec
from .setup import Setup
from .shape import ModelShape, read_shape
from .sizes import processes_default
from .suggest import Suggestion, suggest_changes

# Module names other families use for the same matrices (LoRA target_modules may name them).
ALIASES = {
    "c_attn": ("q_proj", "k_proj", "v_proj"), "query_key_value": ("q_proj", "k_proj", "v_proj"),
    "qkv_proj": ("q_proj", "k_proj", "v_proj"), "Wqkv": ("q_proj", "k_proj", "v_proj"),
    "query": ("q_proj",), "key": ("k_proj",), "value": ("v_proj",), "q": ("q_proj",), "k": ("k_proj",),
    "v": ("v_proj",), "dense": ("o_proj",), "out_proj": ("o_proj",), "c_proj": ("o_proj", "down_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"), "w1": ("gate_proj",), "w3": ("up_proj",), "w2": ("down_proj",),
    "fc1": ("up_proj",), "c_fc": ("up_proj",), "dense_h_to_4h": ("up_proj",), "fc_in": ("up_proj",),
    "fc2": ("down_proj",), "dense_4h_to_h": ("down_proj",), "fc_out": ("down_proj",),
}


def _lora_targets(targets, shape: ModelShape, notes: list[str]) -> tuple:
    """The block's linear layers that ``model.lora.target_modules`` names (peft's matching; other
    families' names through :data:`ALIASES`)."""
    names = list(shape.linears())
    if targets in (None, "all-linear"):
        return tuple(names)  # peft's all-linear: every linear layer of the blocks, never the LM head
    if isinstance(targets, str):  # peft: a regex matched against full module names
        found = tuple(n for n in names if re.search(targets, f"model.layers.0.block.{n}"))
    else:
        found = []
        for t in targets:
            t = str(t)
            if t in names:
                found.append(t)
            elif t in ALIASES:
                found += [n for n in ALIASES[t] if n in names]
            elif t in ("lm_head", "embed_tokens", "score"):
                notes.append(f"LoRA on '{t}' is counted as an adapter-free module (its adapter is small)")
            else:
                notes.append(f"LoRA target '{t}' matches no linear layer of a Llama-style block: not counted")
        found = tuple(dict.fromkeys(found))
    if not found:
        notes.append("no LoRA target matched a block's linear layers: counted as all-linear")
        return tuple(names)
    return found


def _checkpointing(cfg: dict) -> bool:
    value = cfg.get("activation_checkpointing")
    if value is None:
        value = cfg.get("gradient_checkpointing")
    return True if value is None else bool(value)  # posttrain turns it on on a GPU unless the recipe says


def training_config(recipe, plugins, notes: list | None = None) -> dict:
    """The stage's TRL config values: TRL's defaults, the plugins' contributions and the recipe's
    ``training`` section, checked as ``posttrain validate`` checks them. Whether liger-kernel is
    installed does not matter for an estimate (only for a run), so that one check is left out."""
    import importlib.util

    from .. import trl_fields
    from ..validate import check_training

    liger = recipe.training.get("use_liger_kernel")
    if liger and importlib.util.find_spec("liger_kernel") is None:
        recipe = replace(recipe, training={k: v for k, v in recipe.training.items() if k != "use_liger_kernel"})
        if notes is not None:
            notes.append("liger-kernel is not installed here: the run will need it (pip install 'posttrain[gpu]')")
        checked = {**check_training(recipe, plugins), "use_liger_kernel": liger}
    else:
        checked = check_training(recipe, plugins)
    defaults = trl_fields.config_defaults(recipe.kind.config) if recipe.kind.trains else {}
    return {**defaults, **checked}


@dataclass
class StageInput:
    """One stage to estimate: its recipe and where its model comes from."""

    label: str  # the stage's name in a pipeline, else the recipe's name
    recipe: Any  # a posttrain.recipe.Recipe
    prefix: str  # where its keys live ('' or 'stages.NAME.') for suggestions
    error_prefix: str  # '' or 'stages[i].'
    model_source: str  # name_or_path after resolving stages.NAME
    reference_source: str | None = None  # model.reference, resolved the same way
    reward_models: list = field(default_factory=list)  # (source, dtype) of the reward_model plugin's model
    critic: tuple | None = None  # (source or None for the policy's base, lora_r) of the critic plugin
    notes: list = field(default_factory=list)


def setup_from_recipe(si: StageInput, *, processes: int, prompt_length: int | None,
                      reference_dtype: str | None = None) -> Setup:
    """The :class:`Setup` of one stage, with notes on everything that had to be assumed."""
    from ..plugin_set import build_plugin_set
    from ..validate import check_model

    recipe = si.recipe
    notes: list[str] = list(si.notes)
    try:
        check_model(recipe)  # the refusals `posttrain validate` makes about the model section
    except UserError as e:
        raise _in_stage(e, si.error_prefix) from None
    where = f"{si.error_prefix}model.name_or_path"
    shape = read_shape(si.model_source, where, notes, recipe.model.revision)
    if recipe.kind.head == "reward":
        shape = shape.as_reward_model()
    plugins = build_plugin_set(recipe.plugins, recipe.kind)
    cfg = training_config(recipe, plugins, notes)

    s = _model_setup(recipe, shape, cfg, processes, notes)
    _parallelism(s, cfg)
    facts = recipe.kind.memory(cfg, plugins, recipe, prompt_length=prompt_length, max_positions=shape.max_positions,
                               processes=processes)
    s.rows, s.seq_len, s.scored_tokens, s.reference = facts.rows, facts.seq_len, facts.scored_tokens, facts.reference
    s.prompt_len, s.completion_len, s.generation_rows = facts.prompt_len, facts.completion_len, facts.generation_rows
    s.generation_between_steps, s.gather_for_generation = facts.generation_between_steps, facts.gather_for_generation
    s.vllm_fraction, s.unit = facts.vllm_fraction, facts.unit
    notes.extend(facts.notes)
    _other_model_shapes(s, si, reference_dtype)
    return s


def _model_setup(recipe, shape: ModelShape, cfg: dict, processes: int, notes: list[str]) -> Setup:
    """The setup as the model section and the TRL config make it: precision, batch, full or LoRA/QLoRA,
    checkpointing, Liger, attention and optimizer (the stage's micro-batch shape comes later)."""
    m = recipe.model
    compute = "bfloat16" if m.dtype == "auto" else m.dtype
    if m.dtype == "auto":
        notes.append("model.dtype auto: assumed a GPU with bfloat16 (Ampere or newer)")
    trained = getattr(m, "trained_dtype", None) or "float32"
    if compute == "float32":
        trained = "float32"
    per_device = int(cfg.get("per_device_train_batch_size") or 8)
    grad_accum = int(cfg.get("gradient_accumulation_steps") or 1)

    method = "lora" if m.lora is not None else "full"
    s = Setup(stage=recipe.stage, shape=shape, rows=per_device, seq_len=1, scored_tokens=0, compute=compute,
              trained=trained, method=method, grad_accum=grad_accum, processes=processes, notes=notes)
    if m.lora is not None:
        s.lora_r = m.lora.r
        s.lora_dropout = m.lora.dropout
        s.lora_targets = _lora_targets(m.lora.target_modules, shape, notes)
        s.lora_extra = tuple(m.lora.modules_to_save or ()) + (("score",) if recipe.kind.head == "reward" else ())
    if m.quantization is not None:
        s.quant_bits = m.quantization.bits
        s.double_quant = m.quantization.double_quant
        if KBIT_UPCASTS_UNQUANTISED:
            notes.append("quantised base: embeddings, LM head and norms are not quantised, and peft's "
                         "prepare_model_for_kbit_training (called by posttrain) stores them in float32")
    s.checkpointing = _checkpointing(cfg)
    s.liger = bool(cfg.get("use_liger_kernel"))
    attn = (m.attn_implementation or "sdpa").lower()
    s.attention = "flash" if "flash" in attn else ("eager" if attn == "eager" else "sdpa")
    s.optim = str(cfg.get("optim") or "adamw_torch_fused")
    optim_note = optimizer_spec(s)[2]
    if optim_note:
        notes.append(optim_note)
    return s


def _parallelism(s: Setup, cfg: dict) -> None:
    """DeepSpeed's ZeRO stage and section from ``training.deepspeed``; FSDP is noted, not modelled."""
    ds = deepspeed_config(cfg.get("deepspeed"))
    if ds is not None:
        zero = ds.get("zero_optimization") or {}
        s.zero_stage = int(zero.get("stage", 0))
        s.zero = zero
        if s.trained != "float32":
            s.notes.append("DeepSpeed keeps its own float32 master weights: trained_dtype does not change them")
    if cfg.get("fsdp"):
        s.notes.append("FSDP is not modelled: estimated as one process holding everything (use DeepSpeed ZeRO-3 "
                       "figures as a guide: FSDP full_shard is similar)")


def _other_model_shapes(s: Setup, si: StageInput, reference_dtype: str | None) -> None:
    """The shapes of the other models the stage loads: a reference copy, reward models, the critic."""
    notes = s.notes
    compute = s.compute
    if s.reference == "copy":
        s.reference_dtype = reference_dtype
        if si.reference_source is not None:
            s.reference_shape = read_shape(si.reference_source, f"{si.error_prefix}model.reference", notes)
    for source, dtype in si.reward_models:
        rm_shape = read_shape(source, f"{si.error_prefix}plugins.reward_model.model", notes).as_reward_model()
        s.reward_models += ((rm_shape, compute if dtype == "auto" else dtype),)
    if si.critic is not None:
        source, r = si.critic
        critic_shape = None if source is None else \
            read_shape(source, f"{si.error_prefix}plugins.critic.model", notes).as_reward_model()
        s.critic = (critic_shape, r, compute)
        if s.zero_stage is not None and critic_shape is not None:
            notes.append(f"the critic (a value model) is a DeepSpeed engine of its own with ZeRO stage {s.zero_stage}"
                         + (": sharded like the policy" if s.zero_stage == 3 else ""))
        elif s.zero_stage == 3:
            notes.append("the critic on the policy's base: its adapter, head and AdamW state are counted whole on "
                         "every process")


# -- a recipe's stages ----------------------------------------------------------------------------


def _stage_inputs(data: dict) -> list[StageInput]:
    """The stages of a recipe (one, or a pipeline's), with stages.NAME model references resolved to
    the model the named stage started from (its output has the same shape)."""
    from ..pipeline import parse
    from ..validate import check_stage_references

    pipeline = parse(data)
    if pipeline.single:
        recipe = pipeline.stages[0].recipe
        check_stage_references(recipe, None)
        si = StageInput(recipe.name or "recipe", recipe, "", "", recipe.model.name_or_path)
        _other_models(si, {})
        return [si]
    sources: dict[str, str] = {}
    out = []
    names = [st.name for st in pipeline.stages]
    for st in pipeline.stages:
        try:
            check_stage_references(st.recipe, names[:st.index], names[st.index:])
        except UserError as e:
            raise _in_stage(e, f"stages[{st.index}].") from None
        source = _resolve(st.recipe.model.name_or_path, sources)
        sources[st.name] = source
        si = StageInput(st.name, st.recipe, f"stages.{st.name}.", f"stages[{st.index}].", source)
        if st.recipe.model.name_or_path.startswith("stages."):
            si.notes.append(f"starts from {st.recipe.model.name_or_path}'s output: the shape of {source}")
        _other_models(si, sources)
        out.append(si)
    return out


def _resolve(source: str, sources: dict) -> str:
    while source.startswith("stages.") and source[len("stages."):] in sources:
        source = sources[source[len("stages."):]]
    return source


def _other_models(si: StageInput, sources: dict) -> None:
    """The stage's other models: a reference named by model.reference, the reward_model plugin's model."""
    recipe = si.recipe
    if recipe.model.reference is not None:
        si.reference_source = _resolve(recipe.model.reference, sources)
    options = (recipe.plugins or {}).get("reward_model")  # loaded once, it stays for the run
    if isinstance(options, dict) and options.get("model"):
        si.reward_models = [(_resolve(str(options["model"]), sources), str(options.get("dtype", "auto")))]
    if recipe.stage == "online" and "critic" in (recipe.plugins or {}):
        critic = recipe.plugins["critic"] or {}
        model, r = str(critic.get("model", "policy")), int(critic.get("lora_r", 16))
        si.critic = (None if model == "policy" else _resolve(model, sources), r)


def _in_stage(error: UserError, prefix: str) -> UserError:
    """The same error with its field inside a pipeline stage (``stages[1].`` + ``model.quantization``)."""
    if not prefix or not error.field or error.field.startswith(("stages[", "--")):
        return error
    return UserError(error.message, field=prefix + error.field, fix=error.fix)


# -- estimating every stage -------------------------------------------------------------------------


@dataclass
class StageReport:
    """One stage's estimate, with the suggestions tried when it does not fit in ``gpu`` bytes."""

    label: str
    stage: str
    estimate: Estimate
    suggestions: list  # Suggestion, tried in order
    gpu: float | None

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.estimate.total <= self.gpu


def estimate_data(data: dict, *, gpu: float | None = None, processes: int | None = None,
                  prompt_length: int | None = None, reference_dtype: str | None = None,
                  suggest: bool = True) -> list[StageReport]:
    """Estimate every stage of recipe data (as :func:`posttrain.recipe.load_recipe_data` returns it)."""
    n_proc = processes if processes is not None else processes_default()
    reports = []
    for si in _stage_inputs(data):
        setup = setup_from_recipe(si, processes=n_proc, prompt_length=prompt_length, reference_dtype=reference_dtype)
        est = compute(setup)
        add_vllm_share(est, gpu)
        suggestions: list[Suggestion] = []
        if suggest and gpu is not None and est.total > gpu:
            suggestions = _suggestions(data, si, setup, gpu=gpu, processes=n_proc, prompt_length=prompt_length,
                                       reference_dtype=reference_dtype)
        reports.append(StageReport(si.label, si.recipe.stage, est, suggestions, gpu))
    return reports


def _suggestions(data: dict, si: StageInput, setup: Setup, *, gpu: float, processes: int,
                 **kwargs) -> list[Suggestion]:
    """The changes of :mod:`.suggest` for a stage that does not fit, each checked by estimating the recipe
    with it (the same path as ``posttrain estimate --set ...``)."""
    from ..recipe import apply_override
    from ..plugin_set import build_plugin_set

    def attempt(sets: list, procs: int | None) -> Estimate | None:
        trial = copy.deepcopy(data)
        try:
            for assignment in sets:
                apply_override(trial, assignment)
            reports = estimate_data(trial, gpu=gpu, processes=procs or processes, suggest=False, **kwargs)
        except UserError:
            return None
        return next(r for r in reports if r.label == si.label).estimate

    cfg = training_config(si.recipe, build_plugin_set(si.recipe.plugins, si.recipe.kind))
    batch = int(cfg.get("per_device_train_batch_size") or 8)
    accum = int(cfg.get("gradient_accumulation_steps") or 1)
    return suggest_changes(setup, si.prefix, batch, accum, gpu, attempt)


def estimate_recipe(path, overrides=(), removals=(), **kwargs) -> list[StageReport]:
    """Estimate a recipe file (``--set``/``--unset`` applied), one report per stage."""
    from ..recipe import load_recipe_data

    return estimate_data(load_recipe_data(path, overrides, removals), **kwargs)
