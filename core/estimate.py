"""``posttrain estimate``: peak GPU memory per device, predicted from a recipe and the model's ``config.json``.

Nothing is downloaded or loaded and torch is never imported (nor transformers, TRL or peft): the
model's shape comes from its ``config.json`` (a local folder, the local Hugging Face cache, or
posttrain's converted built-in model) and everything else from the recipe, TRL's config defaults
(read from TRL's source by :mod:`posttrain.trl_fields`) and the enabled plugins.

The estimate is a sum of terms, each a formula in the model's shape and the recipe's settings
(docs/estimate.md explains every one):

- stored weights: frozen weights in the compute dtype or 4/8-bit; trained weights in
  ``model.trained_dtype`` (float32 master weights by default); their gradients and the
  optimizer's state; a frozen reference copy; reward models; DDP/DeepSpeed buffers;
- activations: what autograd saves for the backward pass, per token and per decoder layer, read
  off the Llama block (norms, projections, rotary attention, gated MLP) under autocast, LoRA
  and checkpointing; these per-layer rules are checked against the bytes autograd really saves
  on a tiny Llama (tests/test_estimate.py);
- the fused LM head's buffers (TRL scores log-probs in tiles instead of materialising logits);
- generation's KV cache (online stage).

The peak is the largest of a few moments of a training step (the forward pass, either end of the
backward pass, the optimizer step, generation), plus an overhead for the CUDA context and the
caching allocator.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import UserError
from .process import world_size
from .validate import deepspeed_config

GiB = 2 ** 30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# -- constants, each with where it comes from ---------------------------------------------------

# TRL's fused LM head (trl/kernels/chunked_logprob.py, TRL 1.16): tiles of TOKEN_CHUNK_SIZE tokens
# x _CHUNKED_LOGPROB_CHUNK_SIZE vocabulary entries in the compute dtype; the backward accumulates the
# hidden-state gradient (and the head's weight gradient when it is trained) in float32.
HEAD_TOKEN_TILE = 4096
HEAD_VOCAB_TILE = 32768

# bitsandbytes 4-bit: blocks of 64 weights share one absmax constant (float32; with double
# quantisation an 8-bit constant plus one float32 per 256 blocks).
NF4_BLOCK = 64
NF4_SECOND_BLOCK = 256

# peft's prepare_model_for_kbit_training (which core/models.py calls for every quantised model)
# casts every parameter that is not 4/8-bit, embeddings and lm_head included, to float32. The
# residual stream then runs in float32 too (the embedding's output is float32 and bitsandbytes
# layers return their input's dtype). The 7B QLoRA calibration figure agrees (docs/estimate.md).
KBIT_UPCASTS_UNQUANTISED = True

# Outside max_memory_allocated: the CUDA context (kernels, cuBLAS handles; about 0.5 GiB with
# torch's lazy module loading) and what the caching allocator holds but has not handed out
# (fragmentation; typically a few percent of the peak). Rules of thumb, not calibrated here.
CUDA_CONTEXT_GIB = 0.5
ALLOCATOR_SLACK = 0.05
NCCL_BUFFERS_GIB = 0.5  # communication buffers when several processes train together

# DeepSpeed's defaults for the buckets it allocates (deepspeed/runtime/zero/config.py) and the
# values the Hugging Face integration puts where a config says "auto".
DS_REDUCE_BUCKET = 500_000_000
DS_PREFETCH_BUCKET = 50_000_000
DS_MAX_LIVE_PARAMETERS = 1_000_000_000

# Model families whose MLP is not gated (two matrices, not three) and whose configs tie the
# embeddings by default when config.json does not say.
NON_GATED_MLP = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "gpt_bigcode", "starcoder2", "mpt",
                 "codegen"}
TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text", "gpt2", "opt", "bloom"}

# training.optim: (states per trained parameter, bytes per state or None for the trained dtype's,
# what is assumed). transformers' default with torch >= 2.8 is adamw_torch_fused.
OPTIMIZERS = {
    "adamw_torch_fused": (2, None, ""),
    "adamw_torch": (2, None, "foreach AdamW: one temporary the size of a state during the step"),
    "adamw_torch_xla": (2, None, ""),
    "adamw_apex_fused": (2, None, ""),
    "adamw_anyprecision": (2, None, ""),
    "adamw_bnb_8bit": (2, 1, "8-bit AdamW (bitsandbytes): one byte per state"),
    "adamw_8bit": (2, 1, "8-bit AdamW (bitsandbytes): one byte per state"),
    "adamw_torch_8bit": (2, 1, "8-bit AdamW (torchao): one byte per state"),
    "adamw_torch_4bit": (2, 0.5, "4-bit AdamW (torchao): half a byte per state"),
    "paged_adamw_32bit": (2, 4, "paged AdamW: counted on the GPU, but bitsandbytes pages it to CPU memory when "
                                "the GPU is full"),
    "paged_adamw_8bit": (2, 1, "paged 8-bit AdamW: counted on the GPU, but bitsandbytes pages it to CPU memory "
                               "when the GPU is full"),
    "lion_32bit": (1, 4, ""), "lion_8bit": (1, 1, ""), "paged_lion_32bit": (1, 4, ""), "paged_lion_8bit": (1, 1, ""),
    "sgd": (0, None, "SGD without momentum: no state"),
    "adagrad": (1, None, ""), "rmsprop": (1, None, ""),
    "adafactor": (0, None, "Adafactor: factored second moments, negligible state"),
}
FOREACH_TEMPORARY = {"adamw_torch"}

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


# -- the model's shape ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that memory depends on, from its config.json."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    gated: bool = True
    attention_bias: bool = False
    experts: int = 0  # mixture of experts: experts per layer (0: dense)
    experts_per_token: int = 0
    max_positions: int | None = None
    reward_head: bool = False  # a sequence classifier with one output instead of the LM head

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """The linear layers of one block: name -> (in_features, out_features); per expert for MoE."""
        h, i = self.hidden, self.intermediate
        out = {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
               "o_proj": (self.q_dim, h)}
        if self.gated:
            out.update(gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
        else:
            out.update(up_proj=(h, i), down_proj=(i, h))
        return out

    def copies(self, name: str) -> int:
        """How many of this matrix one block holds (experts for MoE MLP matrices)."""
        return self.experts if self.experts and name in ("gate_proj", "up_proj", "down_proj") else 1

    @property
    def linear_params_per_layer(self) -> int:
        return sum(a * b * self.copies(n) for n, (a, b) in self.linears().items())

    @property
    def other_params_per_layer(self) -> int:
        """Norm weights, attention biases and the MoE router."""
        extra = 2 * self.hidden
        if self.attention_bias:
            extra += self.q_dim + 2 * self.kv_dim
        if self.experts:
            extra += self.hidden * self.experts
        return extra

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """The LM head (0 when tied to the embeddings), or a reward model's scalar head."""
        if self.reward_head:
            return self.hidden
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def linear_params(self) -> int:
        return self.layers * self.linear_params_per_layer

    @property
    def params(self) -> int:
        return (self.linear_params + self.layers * self.other_params_per_layer + self.embedding_params
                + self.head_params + self.hidden)

    @property
    def mlp_width(self) -> int:
        """Intermediate activations per token: the MLP width, times the experts each token visits (MoE)."""
        return self.intermediate * (self.experts_per_token if self.experts else 1)

    def as_reward_model(self) -> "ModelShape":
        return replace(self, reward_head=True)

    def describe(self) -> dict:
        return {"model_type": self.model_type, "parameters": self.params, "hidden_size": self.hidden,
                "layers": self.layers, "attention_heads": self.heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "intermediate_size": self.intermediate, "vocab_size": self.vocab,
                "tied_embeddings": self.tied, "experts": self.experts, "reward_head": self.reward_head}


def shape_from_config(config: dict, where: str, notes: list[str]) -> ModelShape:
    """A :class:`ModelShape` from config.json's content (Llama-style names, with common aliases)."""
    text = config
    if isinstance(config.get("text_config"), dict):
        text = {**config["text_config"]}
        notes.append("multimodal config: only the language model is counted (not the vision/audio towers)")

    def get(*names, default=None):
        for name in names:
            if text.get(name) is not None:
                return text[name]
        return default

    model_type = str(get("model_type", default=config.get("model_type", "unknown")))
    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    heads = get("num_attention_heads", "n_head", "num_heads")
    vocab = get("vocab_size")
    missing = [n for n, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads), ("vocab_size", vocab)) if v is None]
    if missing:
        raise UserError(f"config.json has no {', '.join(missing)}: posttrain estimate reads decoder-only "
                        "transformer configs (Llama, Mistral, Qwen, Gemma, GPT-2 style)", field=where,
                        fix="point at the folder of a causal language model saved with save_pretrained")
    kv_heads = get("num_key_value_heads", "num_kv_heads", "multi_query_group_num")
    if kv_heads is None:
        kv_heads = 1 if get("multi_query") else heads
    head_dim = get("head_dim") or hidden // heads
    intermediate = get("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size") or 4 * hidden
    experts = get("num_local_experts", "num_experts", "n_routed_experts", default=0) or 0
    per_token = 0
    if experts:
        per_token = get("num_experts_per_tok", "top_k", "moe_top_k", default=2)
        intermediate = get("moe_intermediate_size", default=intermediate)
        notes.append(f"mixture of experts ({experts} experts, {per_token} per token): every expert's weights are "
                     "counted; activations as if each token's experts were one MLP (shared experts not counted)")
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    if tied is None:
        tied = model_type in TIED_BY_DEFAULT
        notes.append(f"config.json does not say whether the embeddings are tied: assumed {'tied' if tied else 'not'}")
    return ModelShape(
        model_type=model_type, hidden=int(hidden), layers=int(layers), heads=int(heads), kv_heads=int(kv_heads),
        head_dim=int(head_dim), intermediate=int(intermediate), vocab=int(vocab), tied=bool(tied),
        gated=model_type not in NON_GATED_MLP, attention_bias=bool(get("attention_bias", "qkv_bias", default=False)),
        experts=int(experts), experts_per_token=int(per_token),
        max_positions=get("max_position_embeddings", "n_positions", "max_sequence_length"))


# -- finding config.json without loading anything ----------------------------------------------


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = Path(os.environ["HF_HOME"]).expanduser() if os.environ.get("HF_HOME") else (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "huggingface")
    return home / "hub"


def _hub_config(repo_id: str, revision: str | None, where: str) -> Path:
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    candidates: list[Path] = []
    ref = repo / "refs" / (revision or "main")
    if ref.is_file():
        candidates.append(snapshots / ref.read_text().strip() / "config.json")
    if revision:
        candidates.append(snapshots / revision / "config.json")
    elif snapshots.is_dir():
        candidates += sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"'{repo_id}' is not a local folder and its config.json is not in the Hugging Face cache "
                    f"({hub_cache_dir()})", field=where,
                    fix=f"download it first (`hf download {repo_id} config.json`), set HF_HOME/HF_HUB_CACHE to the "
                        "cache that has it, or give the model's local folder")


def config_path(name_or_path: str, where: str, revision: str | None = None) -> Path:
    """The config.json a model reference means: a folder, ``builtin:NAME`` or a cached hub id."""
    from .models import BUILTIN_MODELS, cache_dir

    if name_or_path.startswith("builtin:"):
        name = name_or_path.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            from .errors import did_you_mean

            raise UserError(f"unknown built-in model '{name}'{did_you_mean(name, BUILTIN_MODELS)}", field=where,
                            fix=f"built-in models: {', '.join(BUILTIN_MODELS)}")
        path = cache_dir() / "models" / name / "config.json"
        if not path.is_file():
            raise UserError(f"the built-in model '{name}' has not been converted yet (no {path})", field=where,
                            fix="convert it once (about a minute): python -c \"from posttrain.models import "
                                f"builtin_model_path; builtin_model_path('{name}')\", or run any recipe that uses it")
        return path
    local = Path(name_or_path).expanduser()
    if name_or_path.startswith((".", "/", "~")) or local.exists():
        if not local.is_dir():
            raise UserError(f"model folder '{name_or_path}' does not exist", field=where,
                            fix="give a folder saved with save_pretrained, a hub id, or a builtin: name")
        if not (local / "config.json").is_file():
            if (local / "adapter_config.json").is_file():
                base = json.loads((local / "adapter_config.json").read_text()).get("base_model_name_or_path")
                if base:
                    return config_path(base, where)
            raise UserError(f"'{name_or_path}' has no config.json, so it is not a Hugging Face model folder",
                            field=where, fix="point at the folder written by save_pretrained")
        return local / "config.json"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path):
        return _hub_config(name_or_path, revision, where)
    raise UserError(f"'{name_or_path}' is neither a model folder nor a hub id (org/name)", field=where,
                    fix="give a folder saved with save_pretrained, a hub id, or a builtin: name")


def read_shape(name_or_path: str, where: str, notes: list[str], revision: str | None = None) -> ModelShape:
    path = config_path(name_or_path, where, revision)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}", field=where, fix="check the model folder's config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object", field=where, fix="check the model folder's config.json")
    return shape_from_config(config, where, notes)


# -- what a run does, resolved from the recipe ---------------------------------------------------


@dataclass
class Setup:
    """Every setting the memory of a training step depends on (resolved from a recipe; tests and
    suggestions build variants with ``dataclasses.replace``)."""

    stage: str
    shape: ModelShape
    rows: int  # sequences in one micro-batch on one device
    seq_len: int  # tokens per sequence
    scored_tokens: int  # tokens the LM head scores per micro-batch
    compute: str = "bfloat16"
    trained: str = "float32"
    method: str = "full"  # full | lora
    lora_r: int = 16
    lora_targets: tuple = ()
    lora_dropout: float = 0.0
    lora_extra: tuple = ()  # modules_to_save trained in full: 'lm_head', 'embed_tokens', 'score'
    quant_bits: int | None = None
    double_quant: bool = True
    checkpointing: bool = True
    liger: bool = False
    attention: str = "sdpa"  # sdpa | flash | eager
    padded: bool = True  # batches carry padding (an attention mask) — true of real pairs and completions
    dropout_mask_bytes: float = 1  # CUDA's fused dropout keeps a bool mask (on a CPU: the scaled noise itself)
    optim: str = "adamw_torch_fused"
    grad_accum: int = 1
    reference: str = "none"  # none | adapter | copy | precomputed
    reference_shape: ModelShape | None = None
    reference_dtype: str | None = None  # None: the compute dtype
    reward_models: tuple = ()  # (ModelShape, dtype) of frozen reward models (online)
    critic: tuple | None = None  # online with a critic: (ModelShape or None for the policy's base, lora_r, dtype)
    zero_stage: int | None = None  # DeepSpeed ZeRO stage, None without DeepSpeed
    zero: dict = field(default_factory=dict)  # the zero_optimization section
    processes: int = 1
    generation_rows: int = 0  # online: completions generated at once on this device
    prompt_len: int = 0
    completion_len: int = 0
    vllm_fraction: float = 0.0  # online with colocated vLLM: its share of the GPU
    unit: str = "sequences"  # what a row of the micro-batch is, in words
    generation_between_steps: bool = True  # online: generation falls between optimizer steps (no gradients held)
    gather_for_generation: bool = True  # online under ZeRO-3: full parameters gathered to generate
    notes: list = field(default_factory=list)


def _bytes(dtype: str) -> int:
    return BYTES[dtype]


@dataclass
class ActivationDtypes:
    """Bytes per element of the tensors in a block, from the precision and the training method."""

    c: int  # compute dtype (autocast)
    residual: int  # the residual stream (the dtype of the embedding's output)
    norm_weight: int
    norm_trained: bool
    lora: int  # adapter weights
    quantised: bool


def activation_dtypes(s: Setup) -> ActivationDtypes:
    c = _bytes(s.compute)
    if s.zero_stage is not None:  # DeepSpeed holds the module in the compute dtype
        return ActivationDtypes(c, c, c, s.method == "full", c, False)
    if s.method == "full":
        t = _bytes(s.trained)
        return ActivationDtypes(c, t, t, True, t, False)
    if s.quant_bits and KBIT_UPCASTS_UNQUANTISED:
        return ActivationDtypes(c, 4, 4, False, _bytes(s.trained), True)
    return ActivationDtypes(c, c, c, False, _bytes(s.trained), bool(s.quant_bits))


def module_kinds(s: Setup) -> dict[str, str]:
    """Each linear layer of a block: 'full' (trained), 'lora' (frozen base + adapter) or 'frozen'."""
    names = s.shape.linears()
    if s.method == "full":
        return {n: "full" for n in names}
    return {n: ("lora" if n in s.lora_targets else "frozen") for n in names}


def layer_activation_bytes(s: Setup) -> dict[str, float]:
    """What autograd keeps for the backward pass of one decoder block, per token, by part.

    Read off the Llama block as transformers 5 runs it under torch autocast (docs/estimate.md has
    the derivation; tests/test_estimate.py checks the totals against autograd's saved tensors on a
    tiny Llama): an RMSNorm keeps its input in float32 (and, when its weight is trained, the
    normalised input); a trained linear keeps its input in the compute dtype (a cast copy per
    layer when the input is in another dtype); a LoRA layer keeps its dropout mask and its
    adapter's input in the compute dtype; attention keeps q, k, v and its output (k and v for
    every query head when GQA meets a padding mask); the gated MLP keeps the gate's output, its
    SiLU and the up projection. ``per_token_T`` is multiplied by the sequence length (the float
    attention-mask bias that SDPA materialises from a padding mask, eager attention's scores).
    """
    d = activation_dtypes(s)
    sh = s.shape
    h, i = sh.hidden, sh.mlp_width
    kinds = module_kinds(s)
    c = d.c
    dropout = s.lora_dropout > 0

    def consumers(x_bytes: int, dim: int, names: list[str], already_saved: bool = False) -> float:
        """Bytes per token the layers reading one tensor keep of it."""
        saved, shared = 0.0, False
        for name in names:
            kind = kinds[name]
            if kind == "full":
                if x_bytes == c:
                    shared = True
                else:
                    saved += c * dim  # autocast casts the input for each layer; each keeps its copy
            elif kind == "lora":
                saved += c * s.lora_r  # lora_A's output, kept by lora_B
                if dropout:
                    # the dropout mask + the adapter's input in the compute dtype
                    saved += (s.dropout_mask_bytes + c) * dim
                elif d.lora == c and x_bytes == c:
                    shared = True
                else:
                    saved += c * dim  # peft casts x to the adapter's dtype, autocast casts it back: a copy
        if shared and not already_saved:
            saved += x_bytes * dim
        return saved

    def out_bytes(name: str, x_bytes: int) -> int:
        # bitsandbytes layers return their input's dtype; others compute in the autocast dtype
        return x_bytes if (d.quantised and kinds[name] != "full") else c

    def norm() -> tuple[float, int]:
        if s.liger:  # Liger's RMSNorm keeps its input and the inverse RMS; output in the input's dtype
            return d.residual * h + 4, d.residual
        saved = 4 * h + 4  # the float32 input (a copy unless the stream is float32) and the inverse RMS
        if d.norm_trained:
            saved += d.residual * h  # the normalised input, for the weight's gradient
        return saved, max(d.norm_weight, d.residual)

    parts: dict[str, float] = {}
    n1, o1 = norm()
    parts["norms"] = 2 * n1
    parts["attention_inputs"] = consumers(o1, h, ["q_proj", "k_proj", "v_proj"])
    kv_saved = sh.kv_dim
    per_T = 0.0
    if s.attention == "sdpa" and s.padded:
        if sh.kv_dim < sh.q_dim:
            kv_saved = sh.q_dim  # transformers repeats k/v heads when SDPA gets a mask on CUDA
        per_T += c  # the boolean mask becomes a float bias (batch x 1 x T x T) that the kernel keeps
    attention = c * (sh.q_dim + 2 * kv_saved)  # q and k after the rotary embedding, v
    if s.attention == "eager":
        kv_saved = sh.q_dim
        attention = c * (sh.q_dim + 2 * kv_saved)
        per_T += (4 + c) * sh.heads  # float32 softmax output and its compute-dtype copy, per head
        parts["attention"] = attention
        parts["attention_output"] = consumers(c, sh.q_dim, ["o_proj"], already_saved=False)
    else:
        parts["attention"] = attention + c * sh.q_dim + 4 * sh.heads  # + the output and the log-sum-exp
        parts["attention_output"] = consumers(c, sh.q_dim, ["o_proj"], already_saved=True)
    n2, o2 = norm()
    mlp_in = ["gate_proj", "up_proj"] if sh.gated else ["up_proj"]
    parts["mlp_inputs"] = consumers(o2, h, mlp_in)
    up = out_bytes("up_proj", o2)
    if sh.gated:
        gate = out_bytes("gate_proj", o2)
        product = max(gate, up)
        # SiLU keeps its input, the product keeps both factors; Liger's SwiGLU recomputes the SiLU
        parts["mlp"] = (gate + up) * i if s.liger else (2 * gate + up) * i
    else:
        product = up
        parts["mlp"] = up * i  # the activation function keeps its input
    parts["mlp_output"] = consumers(product, i, ["down_proj"])
    parts["per_token_T"] = per_T
    return parts


def per_token_layer(s: Setup) -> float:
    parts = layer_activation_bytes(s)
    return sum(v for k, v in parts.items() if k != "per_token_T") + parts["per_token_T"] * s.seq_len


# -- parameters, gradients and optimizer state ---------------------------------------------------


def lora_params(s: Setup) -> int:
    sh = s.shape
    n = 0
    for name, (a, b) in sh.linears().items():
        if name in s.lora_targets:
            n += s.lora_r * (a + b) * sh.copies(name)
    return n * sh.layers


def extra_trained_params(s: Setup) -> int:
    """modules_to_save: full trained copies (the reward model's score head always)."""
    sh = s.shape
    n = 0
    for name in s.lora_extra:
        if name == "lm_head" and not sh.reward_head:
            n += sh.vocab * sh.hidden
        elif name == "embed_tokens":
            n += sh.embedding_params
        elif name == "score" and sh.reward_head:
            n += sh.hidden
    return n


CRITIC_TRAINED_BYTES = 4 + 4 + 8  # float32 weight, its gradient, AdamW's two float32 moments


def critic_bytes(s: Setup, stage: int | None = None, n_proc: int = 1) -> float:
    """The critic. On the policy's base: a second LoRA adapter on the policy's targets and a value head (the base
    is the policy's own), counted whole on every process with float32 weights, gradients and AdamW. A value
    model (its base in the compute dtype, its LoRA adapter on all linear layers and its score head, or with
    lora_r 0 every weight trained): without DeepSpeed whole on every process; under DeepSpeed a DeepSpeed
    engine of its own with the policy's ZeRO stage, so its float32 masters and AdamW state are partitioned
    from stage 1, its gradients from stage 2 and its weights at stage 3, as the policy's are."""
    shape, r, dtype = s.critic
    if shape is None:
        trained = lora_params(replace(s, lora_r=r)) + s.shape.hidden + 1
        return trained * CRITIC_TRAINED_BYTES
    if r == 0:
        trained, frozen = shape.params, 0
    else:
        trained = lora_params(replace(s, shape=shape, lora_r=r, lora_targets=tuple(shape.linears()))) + shape.hidden
        frozen = shape.params
    if stage is None:
        return frozen * _bytes(dtype) + trained * CRITIC_TRAINED_BYTES
    c = _bytes(dtype)
    module = (frozen + trained) * c / (n_proc if stage >= 3 else 1)  # the engine's module in the compute dtype
    masters_and_adamw = trained * (4 + 8) / (n_proc if stage >= 1 else 1)
    grads = trained * c / (n_proc if stage >= 2 else 1)
    return module + masters_and_adamw + grads


def frozen_weight_bytes(s: Setup) -> float:
    """The policy's frozen weights (LoRA/QLoRA base)."""
    sh = s.shape
    c = _bytes(s.compute)
    if not s.quant_bits:
        return sh.params * c
    per_param = 0.5 + ((1 + 4 / NF4_SECOND_BLOCK) / NF4_BLOCK if s.double_quant else 4 / NF4_BLOCK)
    if s.quant_bits == 8:
        per_param = 1 + 4 / sh.hidden  # int8 weights + one float32 scale per output row
    rest = sh.params - sh.linear_params
    return sh.linear_params * per_param + rest * (4 if KBIT_UPCASTS_UNQUANTISED else c)


@dataclass
class Terms:
    """Bytes of one moment of a training step, by row of the breakdown."""

    weights: float = 0.0
    trainable: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    logits: float = 0.0
    reference: float = 0.0
    reward_models: float = 0.0
    critic: float = 0.0
    generation: float = 0.0
    buffers: float = 0.0

    @property
    def total(self) -> float:
        return sum(vars(self).values())


@dataclass
class Estimate:
    setup: Setup
    phases: dict  # moment -> Terms
    peak_phase: str
    peak: Terms
    overhead: float
    trainable_params: int
    details: dict  # intermediate numbers (bytes), for the docs and tests

    @property
    def peak_allocated(self) -> float:
        return self.peak.total

    @property
    def total(self) -> float:
        return self.peak.total + self.overhead


def optimizer_spec(s: Setup) -> tuple[int, float | None, str]:
    spec = OPTIMIZERS.get(s.optim)
    if spec is None:
        return 2, None, f"training.optim '{s.optim}' is not modelled: counted as AdamW (two states)"
    return spec


def compute(s: Setup) -> Estimate:
    """The estimate of one setup (see the module docstring and docs/estimate.md)."""
    sh = s.shape
    c = _bytes(s.compute)
    d = activation_dtypes(s)
    n_proc = max(1, s.processes)
    stage = s.zero_stage
    zero = s.zero or {}
    offload_opt = str((zero.get("offload_optimizer") or {}).get("device", "none")) in ("cpu", "nvme")
    offload_param = str((zero.get("offload_param") or {}).get("device", "none")) in ("cpu", "nvme")

    states, state_bytes, _ = optimizer_spec(s)
    if s.method == "full":
        trained_n = sh.params
    else:
        trained_n = lora_params(s) + extra_trained_params(s)
    tb = _bytes(s.trained)
    state_bytes = state_bytes if state_bytes is not None else tb

    t = Terms()
    details: dict[str, Any] = {}
    if stage is None:
        if s.method == "full":
            t.trainable = trained_n * tb
        else:
            t.weights = frozen_weight_bytes(s)
            t.trainable = trained_n * tb
        grads = trained_n * tb
        t.optimizer = trained_n * states * state_bytes
        if n_proc > 1:  # DDP keeps a bucket buffer as large as the gradients
            t.buffers += grads
    else:
        # DeepSpeed (bf16/fp16 enabled): the module in the compute dtype, float32 master weights and
        # optimizer state in the ZeRO optimizer, partitioned over the processes from stage 1 on.
        master_bytes = 4
        state_bytes = OPTIMIZERS.get(s.optim, (2, None, ""))[1] or 4
        module = frozen_weight_bytes(s) if s.method != "full" else sh.params * c
        if s.method != "full":
            module += trained_n * c
        t.weights = 0 if offload_param else (module / n_proc if stage >= 3 else module)
        part = (lambda x: x / n_proc) if stage >= 1 else (lambda x: x)  # noqa: E731
        t.trainable = 0 if offload_opt else part(trained_n * master_bytes)
        t.optimizer = 0 if offload_opt else part(trained_n * states * state_bytes)
        grads = trained_n * c / (n_proc if stage >= 2 else 1)
        bucket = zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)
        bucket = sh.hidden ** 2 if bucket == "auto" else float(bucket)
        if stage >= 2:
            t.buffers += min(bucket, trained_n) * c
        if stage >= 3:
            prefetch = zero.get("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET)
            prefetch = 0.9 * sh.hidden ** 2 if prefetch == "auto" else float(prefetch)
            live = float(zero.get("stage3_max_live_parameters", DS_MAX_LIVE_PARAMETERS))
            layer = sh.linear_params_per_layer + sh.other_params_per_layer
            t.buffers += (min(live, 2 * layer) + prefetch) * c  # the gathered block(s) being computed
    details["trainable_params"] = trained_n

    # the reference model
    ref_shape = s.reference_shape or sh
    if s.reference == "copy":
        ref_bytes = _bytes(s.reference_dtype or s.compute)
        t.reference = ref_shape.params * ref_bytes
        if stage is not None and stage >= 3:
            t.reference /= n_proc
    for rm_shape, rm_dtype in s.reward_models:
        t.reward_models += rm_shape.params * _bytes(rm_dtype)
    if s.critic is not None:
        t.critic = critic_bytes(s, stage, n_proc)

    static = replace(t)

    # activations of one micro-batch
    N = s.rows * s.seq_len
    layer = per_token_layer(s)
    autocast_copies = 0.0
    if s.method == "full" and stage is None and tb != c:
        autocast_copies = c * sh.linear_params_per_layer  # autocast's cached compute-dtype weights, per block
    elif s.method != "full" and stage is None and d.lora != c:
        autocast_copies = c * lora_params(s) / sh.layers
    if s.liger:
        final_norm = d.residual * sh.hidden + 4
    else:
        final_norm = 4 * sh.hidden + 4 + (d.residual * sh.hidden if d.norm_trained else 0)
    head_in = max(d.norm_weight, d.residual) if not s.liger else d.residual
    extras = N * final_norm
    head_trained = (s.method == "full" or "lm_head" in s.lora_extra) and not sh.reward_head
    if sh.reward_head:
        extras += N * c * sh.hidden  # the trained score head keeps its input in the compute dtype
    else:
        extras += s.scored_tokens * sh.hidden * head_in  # the fused head keeps the scored hidden states
    if s.checkpointing:
        stored = sh.layers * N * d.residual * sh.hidden + extras  # each block's input
        recompute = N * layer + autocast_copies  # one block, recomputed during its backward
        forward_copies = sh.layers * autocast_copies
    else:
        stored = sh.layers * (N * layer + autocast_copies) + extras
        recompute = 0.0
        forward_copies = 0.0
    product_bytes = max(c, d.residual if d.quantised else c)
    workspace = 2 * product_bytes * sh.mlp_width * N  # gradients of the MLP's widest tensors, one block at a time

    # the LM head (TRL's fused, tiled log-prob kernel), during its backward
    logits = 0.0
    head_grad = 0.0
    head_weight_bytes = (tb if s.method == "full" and stage is None else
                         c if stage is not None or not (s.quant_bits and KBIT_UPCASTS_UNQUANTISED) else 4)
    if not sh.reward_head and s.scored_tokens:
        tile = min(s.scored_tokens, HEAD_TOKEN_TILE) * min(sh.vocab, HEAD_VOCAB_TILE) * c
        logits += tile + 4 * s.scored_tokens * sh.hidden  # a logits tile + the float32 hidden-state gradient
        if head_weight_bytes != c:
            logits += min(sh.vocab, HEAD_VOCAB_TILE) * sh.hidden * c  # the head's rows cast per tile
        if head_trained:
            head_grad = sh.vocab * sh.hidden * (tb if stage is None else c)
            if head_grad and (stage is not None or tb != 4):
                logits += 4 * sh.vocab * sh.hidden  # accumulated in float32, then cast to the weight's dtype
    details.update(tokens=N, per_token_layer=layer, stored=stored, recompute=recompute, workspace=workspace,
                   autocast_copies_per_layer=autocast_copies, extras=extras, grads=grads, logits=logits)

    phases: dict[str, Terms] = {}
    accumulate = grads if s.grad_accum > 1 else 0.0  # earlier micro-batches' gradients stay
    phases["backward"] = replace(static, activations=stored + recompute + workspace, logits=logits,
                                 gradients=max(head_grad, accumulate))
    if s.checkpointing and forward_copies:
        phases["forward"] = replace(static, activations=stored + forward_copies, gradients=accumulate)
    # the last block of the backward pass (the first of the model): every other gradient exists by then
    phases["end of backward"] = replace(static, activations=N * layer + autocast_copies + workspace, gradients=grads)
    temp = 0.0  # foreach AdamW's temporary (a state's size)
    if s.optim in FOREACH_TEMPORARY and stage is None:
        temp = trained_n * state_bytes
    fp32_grads = 0.0  # DeepSpeed: the float32 gradient partition its optimizer steps with
    if stage is not None and not offload_opt:
        fp32_grads = trained_n * 4 / (n_proc if stage >= 1 else 1)
    phases["optimizer step"] = replace(static, gradients=grads + fp32_grads, optimizer=static.optimizer + temp)

    if s.generation_rows:
        kv = sh.layers * 2 * sh.kv_dim * c * s.generation_rows * (s.prompt_len + s.completion_len)
        prefill = s.generation_rows * s.prompt_len * (3 * c * sh.mlp_width)  # the widest transient of the prompt pass
        gathered = 0.0
        if stage is not None and stage >= 3 and s.gather_for_generation:
            gathered = sh.params * c * (1 - 1 / n_proc)
        if s.vllm_fraction:  # vLLM generates in its own reserved share of the GPU (added by _vllm)
            kv, prefill = 0.0, 0.0
        phases["generation"] = replace(static, generation=kv + prefill + gathered,
                                       gradients=0.0 if s.generation_between_steps else grads)
        details.update(kv_cache=kv, prefill=prefill)

    peak_phase = max(phases, key=lambda k: phases[k].total)
    peak = phases[peak_phase]
    overhead = CUDA_CONTEXT_GIB * GiB + ALLOCATOR_SLACK * peak.total + (NCCL_BUFFERS_GIB * GiB if n_proc > 1 else 0)
    return Estimate(s, phases, peak_phase, peak, overhead, trained_n, details)


# -- from a recipe to setups ---------------------------------------------------------------------


def _lora_targets(targets, shape: ModelShape, notes: list[str]) -> tuple:
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


def processes_default() -> int:
    try:
        return max(1, world_size())
    except ValueError:
        return 1


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

    from . import trl_fields
    from .validate import check_training

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
    from .registry import build_plugin_set
    from .validate import check_model

    recipe = si.recipe
    stage = recipe.stage
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
    s = Setup(stage=stage, shape=shape, rows=per_device, seq_len=1, scored_tokens=0, compute=compute,
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

    ds = deepspeed_config(cfg.get("deepspeed"))
    if ds is not None:
        zero = ds.get("zero_optimization") or {}
        s.zero_stage = int(zero.get("stage", 0))
        s.zero = zero
        if s.trained != "float32":
            notes.append("DeepSpeed keeps its own float32 master weights: trained_dtype does not change them")
    if cfg.get("fsdp"):
        notes.append("FSDP is not modelled: estimated as one process holding everything (use DeepSpeed ZeRO-3 "
                     "figures as a guide: FSDP full_shard is similar)")

    facts = recipe.kind.memory(cfg, plugins, recipe, prompt_length=prompt_length, max_positions=shape.max_positions,
                               processes=processes)
    s.rows, s.seq_len, s.scored_tokens, s.reference = facts.rows, facts.seq_len, facts.scored_tokens, facts.reference
    s.prompt_len, s.completion_len, s.generation_rows = facts.prompt_len, facts.completion_len, facts.generation_rows
    s.generation_between_steps, s.gather_for_generation = facts.generation_between_steps, facts.gather_for_generation
    s.vllm_fraction, s.unit = facts.vllm_fraction, facts.unit
    notes.extend(facts.notes)
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
    return s


# -- suggestions ---------------------------------------------------------------------------------


@dataclass
class Suggestion:
    change: str
    sets: list  # --set KEY=VALUE strings
    processes: int | None
    estimate: Estimate | None = None

    def fits(self, gpu: float) -> bool:
        return self.estimate is not None and self.estimate.total <= gpu


def _candidate_changes(s: Setup, prefix: str, cfg_batch: int, cfg_accum: int) -> list[tuple[str, list, int | None]]:
    """Changes to try, in order, each on top of the ones before (ZeRO-3 instead of LoRA/QLoRA)."""
    steps: list[tuple[str, list, int | None]] = []
    base: list[str] = []
    if not s.checkpointing:
        base = [f"{prefix}training.activation_checkpointing=true"]
        steps.append(("turn on activation checkpointing", list(base), None))
    batch = cfg_batch
    while batch > 1:
        batch = max(1, batch // 2)
        accum = cfg_accum * cfg_batch // batch
        sets = base + [f"{prefix}training.per_device_train_batch_size={batch}",
                       f"{prefix}training.gradient_accumulation_steps={accum}"]
        steps.append((f"per-device batch {batch} with {accum} accumulation steps (same effective batch)", sets, None))
    batched = steps[-1][1] if steps else list(base)
    adapter = list(batched)
    if s.method == "full":
        adapter = batched + [f"{prefix}model.lora={{r: 16, alpha: 32}}"]
        steps.append(("train a LoRA adapter (r 16, all linear layers) instead of every weight", adapter, None))
    if not s.quant_bits:
        steps.append(("QLoRA: load the base in 4-bit (nf4)", adapter + [f"{prefix}model.quantization={{bits: 4}}"],
                      None))
    if s.method == "full" and (s.zero_stage or 0) < 3:
        for n in (2, 4, 8):
            ds = (f"{prefix}training.deepspeed={{zero_optimization: {{stage: 3}}, bf16: {{enabled: auto}}, "
                  "train_micro_batch_size_per_gpu: auto, gradient_accumulation_steps: auto}")
            steps.append((f"DeepSpeed ZeRO-3 over {n} GPUs (keeps full fine-tuning)", batched + [ds], n))
    return steps


# -- the command ---------------------------------------------------------------------------------


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*$", re.IGNORECASE)


def parse_gpu_memory(text: str) -> float:
    """GPU memory in bytes from '24GB', '24GiB', '80G', '24' (GiB), '40960MiB'.

    A GPU sold as '24 GB' has 24 GiB, so GB and GiB mean the same here (and M/MB/MiB, T/TB/TiB)."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"cannot read '{text}' as an amount of GPU memory", field="--gpu-memory",
                        fix="write a positive size such as 24GB, 24GiB, 80G or 24 (GiB)")
    unit = (match.group(2) or "g").lower()[0]
    return float(match.group(1)) * {"m": 2 ** 20, "g": GiB, "t": 2 ** 40}[unit]


def parse_processes(text) -> int:
    if text is None:
        return processes_default()
    try:
        value = int(str(text))
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"cannot read '{text}' as a number of processes", field="--processes",
                        fix="give the number of GPUs the run uses, e.g. --processes 8")
    return value


def _stage_inputs(data: dict) -> list[StageInput]:
    """The stages of a recipe (one, or a pipeline's), with stages.NAME model references resolved to
    the model the named stage started from (its output has the same shape)."""
    from .runner import parse
    from .validate import check_stage_references

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


@dataclass
class StageReport:
    label: str
    stage: str
    estimate: Estimate
    suggestions: list  # Suggestion, tried in order
    gpu: float | None

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.estimate.total <= self.gpu


def _vllm(e: Estimate, gpu: float | None) -> None:
    """Colocated vLLM reserves a share of the GPU: add it to the generation moment once the size is known."""
    frac = e.setup.vllm_fraction
    if not frac or "generation" not in e.phases:
        return
    size = gpu if gpu is not None else 80 * GiB
    e.phases["generation"].generation += frac * size
    e.peak_phase = max(e.phases, key=lambda k: e.phases[k].total)
    e.peak = e.phases[e.peak_phase]
    e.overhead = CUDA_CONTEXT_GIB * GiB + ALLOCATOR_SLACK * e.peak.total + (
        NCCL_BUFFERS_GIB * GiB if e.setup.processes > 1 else 0)


def estimate_data(data: dict, *, gpu: float | None = None, processes: int | None = None,
                  prompt_length: int | None = None, reference_dtype: str | None = None,
                  suggest: bool = True) -> list[StageReport]:
    """Estimate every stage of recipe data (as :func:`posttrain.recipe.load_recipe_data` returns it)."""
    n_proc = processes if processes is not None else processes_default()
    reports = []
    for si in _stage_inputs(data):
        setup = setup_from_recipe(si, processes=n_proc, prompt_length=prompt_length, reference_dtype=reference_dtype)
        est = compute(setup)
        _vllm(est, gpu)
        suggestions: list[Suggestion] = []
        if suggest and gpu is not None and est.total > gpu:
            suggestions = _suggest(data, si, setup, gpu=gpu, processes=n_proc, prompt_length=prompt_length,
                                   reference_dtype=reference_dtype)
        reports.append(StageReport(si.label, si.recipe.stage, est, suggestions, gpu))
    return reports


def _suggest(data: dict, si: StageInput, setup: Setup, *, gpu: float, processes: int, **kwargs) -> list[Suggestion]:
    """Try the changes of :func:`_candidate_changes` in order, each checked by estimating the recipe
    with it (the same path as ``posttrain estimate --set ...``). The first that fits (and the first
    ZeRO-3 one) then gets the largest per-device batch that still fits."""
    from .recipe import apply_override
    from .registry import build_plugin_set

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
    batch_keys = (f"{si.prefix}training.per_device_train_batch_size=",
                  f"{si.prefix}training.gradient_accumulation_steps=")
    out: list[Suggestion] = []
    for change, sets, procs in _candidate_changes(setup, si.prefix, batch, accum):
        estimate = attempt(sets, procs)
        if estimate is not None:
            out.append(Suggestion(change, sets, procs, estimate))
    for sg in {id(x): x for x in (next((x for x in out if x.fits(gpu)), None),
                                   next((x for x in out if x.fits(gpu) and x.processes), None)) if x}.values():
        rest = [x for x in sg.sets if not x.startswith(batch_keys)]
        if len(rest) == len(sg.sets) or "per-device batch" in sg.change:
            continue
        tried = batch
        while tried > 1:  # the largest batch (same effective batch) that still fits with the other changes
            sets = rest if tried == batch else rest + [f"{batch_keys[0]}{tried}",
                                                       f"{batch_keys[1]}{accum * batch // tried}"]
            estimate = attempt(sets, sg.processes)
            if estimate is not None and estimate.total <= gpu:
                sg.sets, sg.estimate = sets, estimate
                break
            tried //= 2
    return out


def estimate_recipe(path, overrides=(), removals=(), **kwargs) -> list[StageReport]:
    """Estimate a recipe file (``--set``/``--unset`` applied), one report per stage."""
    from .recipe import load_recipe_data

    return estimate_data(load_recipe_data(path, overrides, removals), **kwargs)


# -- output --------------------------------------------------------------------------------------

ROWS = [
    ("weights", "weights (frozen, stored)"),
    ("trainable", "trainable / master weights"),
    ("gradients", "gradients"),
    ("optimizer", "optimizer state"),
    ("activations", "activations"),
    ("logits", "logits (fused LM head)"),
    ("reference", "reference model"),
    ("reward_models", "reward models"),
    ("critic", "critic (weights, gradients, AdamW)"),
    ("generation", "generation (KV cache)"),
    ("buffers", "DDP / DeepSpeed buffers"),
]


def _gib(x: float) -> float:
    return round(x / GiB, 3)


def describe_setup(s: Setup) -> str:
    sh = s.shape
    how = "full fine-tuning"
    if s.method == "lora":
        how = f"LoRA r={s.lora_r} on {len(s.lora_targets)} of {len(sh.linears())} linear layers per block"
        if s.quant_bits:
            how = f"QLoRA ({s.quant_bits}-bit base), " + how
    ds = f", DeepSpeed ZeRO-{s.zero_stage}" if s.zero_stage is not None else ""
    return (f"{sh.params / 1e9:.2f}B parameters ({sh.model_type}, {sh.layers} layers, hidden {sh.hidden}); {how}; "
            f"compute {s.compute}, trained weights {s.trained}{ds}; {s.processes} process(es)")


def batch_text(s: Setup) -> str:
    text = f"{s.rows} {s.unit} x {s.seq_len} tokens per micro-batch"
    if s.prompt_len:
        text += f" ({s.prompt_len} prompt + {s.completion_len} completion); {s.generation_rows} generated at once"
    text += f"; activation checkpointing {'on' if s.checkpointing else 'off'}"
    if s.liger:
        text += "; Liger kernels"
    if s.grad_accum > 1:
        text += f"; {s.grad_accum} accumulation steps"
    ref = {"none": "none", "adapter": "the base with the adapter disabled (no copy)",
           "copy": f"a frozen copy in {s.reference_dtype or s.compute}",
           "precomputed": "precomputed log-probs (none loaded)"}[s.reference]
    return text + f"; reference: {ref}"


def report_json(reports: list[StageReport], recipe: str) -> dict:
    stages = []
    for r in reports:
        e = r.estimate
        stages.append({
            "stage_name": r.label,
            "stage": r.stage,
            "model": e.setup.shape.describe(),
            "setup": {
                "method": e.setup.method + ("" if not e.setup.quant_bits else f"+{e.setup.quant_bits}bit"),
                "compute_dtype": e.setup.compute, "trained_dtype": e.setup.trained,
                "trainable_parameters": e.trainable_params, "sequences_per_micro_batch": e.setup.rows,
                "tokens_per_sequence": e.setup.seq_len, "activation_checkpointing": e.setup.checkpointing,
                "liger": e.setup.liger, "optimizer": e.setup.optim, "reference": e.setup.reference,
                "deepspeed_zero_stage": e.setup.zero_stage, "processes": e.setup.processes,
                "gradient_accumulation_steps": e.setup.grad_accum,
            },
            "breakdown_gib": {**{k: _gib(getattr(e.peak, k)) for k, _ in ROWS}, "overhead": _gib(e.overhead)},
            "peak_phase": e.peak_phase,
            "phases_gib": {k: _gib(v.total) for k, v in e.phases.items()},
            # what generating adds at its moment: the KV cache, the prompt pass and (ZeRO-3) the gathered weights
            "generation_gib": _gib(e.phases["generation"].generation) if "generation" in e.phases else None,
            "peak_allocated_gib": _gib(e.peak_allocated),
            "overhead_gib": _gib(e.overhead),
            "total_gib": _gib(e.total),
            "gpu_memory_gib": None if r.gpu is None else _gib(r.gpu),
            "fits": r.fits,
            "suggestions": [{"change": sg.change, "set": sg.sets, "processes": sg.processes,
                             "total_gib": _gib(sg.estimate.total), "fits": sg.fits(r.gpu)}
                            for sg in r.suggestions],
            "notes": list(dict.fromkeys(e.setup.notes)),
        })
    worst = max(reports, key=lambda r: r.estimate.total)
    gpu = reports[0].gpu
    return {"recipe": recipe, "gpu_memory_gib": None if gpu is None else _gib(gpu),
            "total_gib": _gib(worst.estimate.total), "peak_allocated_gib": _gib(worst.estimate.peak_allocated),
            "fits": None if gpu is None else all(r.fits for r in reports), "stages": stages}


def _quote(text: str) -> str:
    return f"'{text}'" if re.search(r"[\s{}:,\[\]'\"]", text) else text


def _set_flags(sets: list, flag: str = "--set") -> str:
    return " ".join(f"{flag} {_quote(s)}" for s in sets)


def print_report(reports: list[StageReport], recipe: str, sets: list = (), unsets: list = ()) -> None:
    """The breakdown, verdict and suggestions as text; ``sets``/``unsets`` are the user's own
    --set/--unset values (repeated in the suggested commands)."""
    for r in reports:
        e = r.estimate
        title = f"stage '{r.label}' ({r.stage})" if len(reports) > 1 else f"recipe '{recipe}' ({r.stage})"
        print(title)
        print(f"  model:   {describe_setup(e.setup)}")
        print(f"  batch:   {batch_text(e.setup)}")
        print(f"  peak per GPU, during the {e.peak_phase} (GiB):")
        for key, label in ROWS:
            value = getattr(e.peak, key)
            if value or key in ("weights", "trainable", "gradients", "optimizer", "activations", "logits",
                                "reference"):
                print(f"    {label:<36} {value / GiB:8.2f}")
        print(f"    {'overhead (CUDA context, allocator)':<36} {e.overhead / GiB:8.2f}")
        print(f"    {'total':<36} {e.total / GiB:8.2f}   (allocated by torch: {e.peak_allocated / GiB:.2f})")
        others = ", ".join(f"{k} {v.total / GiB:.2f}" for k, v in e.phases.items() if k != e.peak_phase)
        if others:
            print(f"  other moments (GiB, without overhead): {others}")
        for note in dict.fromkeys(e.setup.notes):
            print(f"  note: {note}")
        if r.gpu is None:
            print("  give --gpu-memory (e.g. 24GB) for a verdict")
        elif r.fits:
            print(f"  verdict: fits in {r.gpu / GiB:.0f} GiB ({(r.gpu - e.total) / GiB:.2f} GiB to spare)")
        else:
            print(f"  verdict: does NOT fit in {r.gpu / GiB:.0f} GiB (needs about {e.total / GiB:.2f} GiB)")
            first = next((sg for sg in r.suggestions if sg.fits(r.gpu)), None)
            zero3 = None
            if first is not None and any(".lora=" in x or ".quantization=" in x for x in first.sets):
                # an alternative that keeps full fine-tuning
                zero3 = next((sg for sg in r.suggestions if sg.fits(r.gpu) and sg.processes), None)
            if first is None:
                best = min(r.suggestions, key=lambda sg: sg.estimate.total, default=None)
                print("  none of the changes tried fits" + (
                    f"; the smallest: {best.change} ({best.estimate.total / GiB:.2f} GiB)" if best else ""))
            for sg in [first] + ([zero3] if zero3 is not None and zero3 is not first else []):
                if sg is None:
                    continue
                launch = f" --processes {sg.processes}" if sg.processes else ""
                print(f"  suggestion: {sg.change}: {sg.estimate.total / GiB:.2f} GiB")
                own = " ".join(x for x in (_set_flags(sets), _set_flags(unsets, "--unset")) if x)
                print(f"    posttrain estimate {_quote(recipe)} {own + ' ' if own else ''}{_set_flags(sg.sets)}"
                      f"{launch} --gpu-memory {r.gpu / GiB:g}GiB")
        if len(reports) > 1:
            print()
