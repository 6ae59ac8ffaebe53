"""A model's shape (:class:`ModelShape`: the numbers of a decoder-only transformer that memory depends on),
read from its ``config.json`` without loading anything: a local folder (or a LoRA adapter's base), a
``builtin:NAME`` model posttrain has converted, or a hub id in the local Hugging Face cache."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UserError

# Model families whose MLP is not gated (two matrices, not three) and whose configs tie the
# embeddings by default when config.json does not say.
NON_GATED_MLP = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "gpt_bigcode", "starcoder2", "mpt",
                 "codegen"}
TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text", "gpt2", "opt", "bloom"}


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
    from ..models import BUILTIN_MODELS, cache_dir

    if name_or_path.startswith("builtin:"):
        name = name_or_path.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            from ..errors import did_you_mean

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
    """The shape of the model ``name_or_path`` names (see :func:`config_path`); what had to be assumed
    goes to ``notes``, and ``where`` is the recipe field errors point at."""
    path = config_path(name_or_path, where, revision)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}", field=where, fix="check the model folder's config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object", field=where, fix="check the model folder's config.json")
    return shape_from_config(config, where, notes)
