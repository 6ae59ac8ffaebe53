"""posttrain against plain TRL at GPU scale, in one process: DPO full fine-tuning, DPO + LoRA and
GRPO + LoRA, each with and without TRL's ``use_liger_kernel``.

    python bench/gpu.py [--smoke] [--only dpo-full,dpo-lora,grpo-lora] [--liger both|on|off]
                        [--steps N] [--repeats N] [--out FILE.json] [--tokenizer DIR] [--peak-tflops F]

The same comparison as bench/overhead.py and bench/online.py (they share ``StepTimer`` and
``alternate``): each workload runs through posttrain and through plain TRL, alternating, and the
median step time after the warm-up steps is compared. Prints JSON.

What runs (defaults):

- a random Llama of 503M parameters built from a config (hidden 1024, 24 layers, 16 heads, 16 kv
  heads, intermediate 4096, vocab 49152, untied embeddings), saved in bf16 to a temporary folder
  (/dev/shm when it has room), with SmolLM2's tokenizer from posttrain's cache
  (``posttrain.models.cache_dir()/models/smollm2-135m-instruct``) or ``--tokenizer DIR``, else the
  tiny BPE tokenizer of ``posttrain.testing.build_tiny_model`` (the model's vocab stays 49152);
- posttrain's default precision on a GPU: bf16 autocast, float32 master weights for what is
  trained, the frozen LoRA base and the full-FT reference in bf16. The posttrain side is built by
  the stage's own ``build_trainer`` (``load_model``, ``load_frozen_model``, ``build_config``,
  ``finish_trainer``: the code of ``posttrain run``), from a recipe with the settings below. Plain
  TRL gets the same config values (``trl_values``), the same models in the same dtypes (policy in
  float32, or the base in bf16 with LoRA; a bf16 reference passed as ``ref_model``, since TRL would
  otherwise copy the float32 policy), the same data, seed and batch. ``dtypes`` in the report
  shows what each side trained and kept frozen;
- DPO: 8 pairs per step, each sequence 512 prompt + 512 completion tokens (synthetic text of
  words that are one token each, EOS cut by ``max_length`` 1024; the tokenised lengths are
  checked before training, and the tokens of each step are counted from TRL's ``num_tokens``);
  sigmoid loss, beta 0.1 (posttrain's ``dpo`` plugin, TRL's default loss);
- GRPO: 8 prompts of 128 tokens x 4 completions of 64 new tokens per step, beta 0 (TRL's
  default), the reward of bench/online.py (the share of digits in the completion; posttrain gets it
  as a plugin with group_relative + advantage_norm scope 'group', TRL gets the function and its
  default scale_rewards='group'), generation by transformers. posttrain generates under the compute
  dtype's autocast, plain TRL without it: with the frozen bf16 base only the adapter's small
  matmuls differ (float32 in TRL), so the first step's completions agree and later ones may drift;
- activation checkpointing as posttrain's default (on on a GPU; ``--checkpointing`` to change),
  the same on both sides; LoRA r 16, alpha 32, no dropout, all linear layers.

Reported per workload: median step time of each side and their ratio, tokens per step (counted)
and tokens/s, MFU against the GPU's bf16 dense peak (a table of known peaks by device name,
``--peak-tflops`` to override), peak memory (``torch.cuda.max_memory_allocated``, reset before
each run, model loading included), the first and per-step losses of both sides; for GRPO the share
of each step spent generating (the trainer's ``_generate_single_turn`` is wrapped with a timer that
synchronises the GPU at both ends; one generation per step) and generated tokens per second of
generation. FLOPs per step: 8·N·T for DPO (policy forward + backward 6·N·T, reference forward
2·N·T), where N counts the parameters that take part in matmuls (all but the input embedding) and
T the tokens of the step; LoRA is counted the same way (its backward skips the frozen weights'
gradients, so this overstates its work); GRPO 8·N·T too: 6·N·T to train on the prompt +
completion tokens and 2·N·T to generate them (prefill and decode), no reference at beta 0.
Attention's own FLOPs are not counted.

Step times are taken with the GPU synchronised at each step's start and end. Liger's patches are
global (they replace functions and classes of transformers' Llama module when training starts):
they are undone after each run, so that every run starts as in a fresh process, and the runs
without Liger come first.

Figures seen on one H100 80GB (bf16, to compare with; not asserted; docs/results.md; the DPO runs had 8 pairs
x 512 tokens per sequence, i.e. ``--prompt-tokens 256 --completion-tokens 256``): DPO full FT
0.149 s/step, ~55k tokens/s, 20% MFU; with Liger 0.154 -> 0.136 s/step and 14.9 -> 11.9 GiB;
DPO + LoRA 0.28-0.31 s/step; GRPO + LoRA ~4 s/step, 84-95% of it generating, ~530 generated
tokens/s; posttrain's step time equal to TRL's (ratios 0.91-1.07).

``--smoke``: a tiny model (``build_tiny_model``, hidden 64) and a few short steps, on the CPU in
well under a minute, with the same fields (MFU and memory null on a CPU, with the reason).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from online import DigitShare, digit_share  # noqa: E402
from overhead import StepTimer, alternate  # noqa: E402
from posttrain.models import cache_dir, run_precision, torch_dtype  # noqa: E402
from posttrain.plugins.advantage_norm import AdvantageNorm  # noqa: E402
from posttrain.plugins.dpo import DPO  # noqa: E402
from posttrain.plugins.group_relative import GroupRelative  # noqa: E402
from posttrain.pipeline import recipe_from_data  # noqa: E402
from posttrain.plugin_set import PluginSet  # noqa: E402
from posttrain.trainers import online as online_stage  # noqa: E402
from posttrain.trainers import preference as preference_stage  # noqa: E402
from posttrain.trainers.config import trl_values  # noqa: E402
from posttrain.testing import build_tiny_model  # noqa: E402
from posttrain.validate import Plan, check_training  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, set_seed  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer  # noqa: E402

SEED = 0
BETA = 0.1
WORKLOADS = ("dpo-full", "dpo-lora", "grpo-lora")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
GIB = 2**30

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched against the
# lower-cased device name; the first match wins.
PEAK_BF16_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200", 989.0),  # and GH200
    ("h800", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("l4", 121.0),
    ("rtx 4090", 165.0),
)


@dataclass(frozen=True)
class Sizes:
    """The workloads' shapes: the full run's, or the smoke run's (``SMOKE``)."""

    hidden: int = 1024
    layers: int = 24
    heads: int = 16
    kv_heads: int = 16
    intermediate: int = 4096
    vocab: int = 49152
    pairs: int = 8  # DPO pairs per step
    prompt_tokens: int = 512  # DPO
    completion_tokens: int = 512  # DPO, each of chosen and rejected
    grpo_prompts: int = 8  # per step
    grpo_generations: int = 4  # per prompt
    grpo_prompt_tokens: int = 128
    new_tokens: int = 64
    steps: int = 10
    warmup: int = 3  # steps left out of the median
    repeats: int = 2


SMOKE = Sizes(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=600, pairs=8, prompt_tokens=16,
              completion_tokens=16, grpo_prompts=4, grpo_generations=4, grpo_prompt_tokens=16, new_tokens=8, steps=4,
              warmup=1, repeats=1)


# -- timers ---------------------------------------------------------------------------------------

def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class GenerationTimer:
    """Wraps a GRPO trainer's ``_generate_single_turn`` (TRL's generation, or posttrain's override of
    it, which adds autocast): seconds and generated tokens of every call, the GPU synchronised at
    both ends. With one generation batch per step there is one call per step."""

    def __init__(self, trainer):
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        inner = trainer._generate_single_turn

        def timed(*args, **kwargs):
            synchronize()
            start = time.perf_counter()
            result = inner(*args, **kwargs)
            synchronize()
            self.seconds.append(time.perf_counter() - start)
            self.tokens.append(sum(len(ids) for ids in result[0]))
            return result

        trainer._generate_single_turn = timed


# -- model, tokenizer, data -----------------------------------------------------------------------

def temp_root(needed_bytes: int) -> str | None:
    """/dev/shm when it exists and has room for the model (with margin), else the default temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > needed_bytes * 1.5 + 2**28:
        return str(shm)
    return None


def model_bytes(sizes: Sizes) -> int:
    """bf16 bytes of the full model (an estimate, to choose where to save it)."""
    s = sizes
    per_layer = 4 * s.hidden * s.hidden + 3 * s.hidden * s.intermediate
    return 2 * (s.layers * per_layer + 2 * s.vocab * s.hidden)


def tokenizer_source(given: str | None) -> Path | None:
    """The tokenizer folder: ``--tokenizer``, else SmolLM2's converted tokenizer when cached, else None."""
    if given:
        return Path(given).expanduser()
    smollm2 = cache_dir() / "models" / "smollm2-135m-instruct"
    return smollm2 if (smollm2 / "tokenizer_config.json").is_file() else None


def build_model(folder: Path, sizes: Sizes, smoke: bool, tokenizer_dir: Path | None) -> dict:
    """Save the benchmark's random Llama and its tokenizer to ``folder``; return what describes them."""
    if smoke:
        build_tiny_model(folder, hidden=sizes.hidden, layers=sizes.layers, heads=sizes.heads,
                         kv_heads=sizes.kv_heads, intermediate=sizes.intermediate, vocab=sizes.vocab, seed=SEED)
        tokenizer = "tiny BPE tokenizer of posttrain.testing.build_tiny_model"
    else:
        if tokenizer_dir is not None:
            tok = AutoTokenizer.from_pretrained(tokenizer_dir)
            tokenizer = str(tokenizer_dir)
        else:
            build_tiny_model(folder.parent / "tiny-tokenizer", seed=SEED)
            tok = AutoTokenizer.from_pretrained(folder.parent / "tiny-tokenizer")
            tokenizer = ("tiny BPE tokenizer of posttrain.testing.build_tiny_model (SmolLM2's is not in posttrain's "
                         "cache; --tokenizer DIR to give one)")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if len(tok) > sizes.vocab:
            raise SystemExit(f"the tokenizer has {len(tok)} tokens, more than the model's vocab of {sizes.vocab}")
        config = LlamaConfig(vocab_size=sizes.vocab, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
                             num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                             num_key_value_heads=sizes.kv_heads,
                             max_position_embeddings=max(2048, sizes.prompt_tokens + sizes.completion_tokens,
                                                         sizes.grpo_prompt_tokens + sizes.new_tokens),
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        torch.manual_seed(SEED)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is quick on a GPU
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.to(torch.bfloat16).save_pretrained(folder)  # bf16 weights: the float32 policy and bf16 reference agree
        tok.save_pretrained(folder)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in meta.parameters())
    embedding = meta.get_input_embeddings().weight.numel()
    return {"parameters": parameters, "matmul_parameters": parameters - embedding, "hidden": config.hidden_size,
            "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "intermediate": config.intermediate_size,
            "vocab": config.vocab_size, "tied_embeddings": bool(config.tie_word_embeddings),
            "saved_in": str(folder.parent), "tokenizer": tokenizer}


def one_token_words(tok, n: int = 6) -> list[str]:
    """``n`` words (with their leading space) that the tokenizer encodes as one token each, also when
    repeated: text of k of them is exactly k tokens."""
    words = []
    for i in range(len(tok)):
        text = tok.decode([i])
        if len(text) < 3 or text[0] != " " or not text[1:].isalpha():
            continue
        if tok(text * 4, add_special_tokens=False)["input_ids"] == [i] * 4:
            words.append(text)
            if len(words) == n:
                return words
    raise SystemExit(f"the tokenizer has fewer than {n} words that are one token each; give another (--tokenizer)")


def repeated(tok, word: str, tokens: int) -> str:
    """``word`` repeated so that the text (with the tokenizer's special tokens) is ``tokens`` tokens."""
    special = len(tok(word)["input_ids"]) - 1
    text = word * (tokens - special)
    got = len(tok(text)["input_ids"])
    if got != tokens:
        raise SystemExit(f"synthetic text of {word!r} is {got} tokens, not {tokens}")
    return text


def build_data(folder: Path, model_dir: Path, sizes: Sizes, steps: int) -> dict:
    """Synthetic DPO pairs and GRPO prompts of exact token lengths, as rows and as .jsonl files."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    words = one_token_words(tok)
    k = len(words)
    pairs = [{"prompt": repeated(tok, words[i % k], sizes.prompt_tokens),
              "chosen": words[(i + 1) % k] * sizes.completion_tokens,
              "rejected": words[(i + 2) % k] * sizes.completion_tokens} for i in range(sizes.pairs * steps)]
    prompts = [{"prompt": repeated(tok, words[i % k], sizes.grpo_prompt_tokens)}
               for i in range(sizes.grpo_prompts * steps)]
    files = {}
    for name, rows in (("pairs", pairs), ("prompts", prompts)):
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"pairs": pairs, "prompts": prompts, "files": files, "words": words}


# -- one run of one side --------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    name: str
    liger: bool

    @property
    def key(self) -> str:
        return self.name + ("+liger" if self.liger else "")

    @property
    def grpo(self) -> bool:
        return self.name.startswith("grpo")

    @property
    def lora(self) -> bool:
        return self.name.endswith("lora")


class Bench:
    def __init__(self, tmp: Path, model_dir: Path, data: dict, sizes: Sizes, checkpointing: str):
        self.tmp, self.model_dir, self.data, self.sizes, self.checkpointing = tmp, model_dir, data, sizes, checkpointing

    def plugins(self, w: Workload) -> PluginSet:
        if w.grpo:  # as bench/online.py: GRPO's advantages as plugins
            return PluginSet([DigitShare(), GroupRelative(), AdvantageNorm(AdvantageNorm.Options(scope="group"))])
        return PluginSet([DPO(DPO.Options(beta=BETA))])

    def plan(self, w: Workload) -> Plan:
        """The recipe posttrain runs (as ``posttrain run`` reads one), its training section checked as
        posttrain checks it (``check_training``, which also merges what the plugins contribute)."""
        s = self.sizes
        training = {"learning_rate": 1e-4 if w.lora else 1e-5, "max_steps": s.steps, "logging_steps": 1,
                    "save_strategy": "no", "report_to": "none"}
        if w.grpo:
            training.update(per_device_train_batch_size=s.grpo_prompts * s.grpo_generations,
                            num_generations=s.grpo_generations, max_completion_length=s.new_tokens)
        else:
            training.update(per_device_train_batch_size=s.pairs, max_length=s.prompt_tokens + s.completion_tokens)
        if self.checkpointing != "auto":
            training["activation_checkpointing"] = self.checkpointing == "on"
        if w.liger:
            training["use_liger_kernel"] = True
        raw = {
            "name": f"bench-gpu-{w.key}",
            "stage": "online" if w.grpo else "preference",
            "seed": SEED,
            "model": {"name_or_path": str(self.model_dir), "lora": dict(LORA) if w.lora else None},
            # raw: the text prompts reach the model as they reach plain TRL (the same tokens on both sides)
            "data": {"source": str(self.data["files"]["prompts" if w.grpo else "pairs"]), "eval": {"fraction": 0},
                     "prompt_format": "raw"},
            "plugins": ({"digit_share": {}, "group_relative": {}, "advantage_norm": {"scope": "group"}} if w.grpo
                        else {"dpo": {"beta": BETA}}),
            "training": training,
            "eval": {"before": False, "generate": 0},
        }
        recipe = recipe_from_data(raw)
        plugins = self.plugins(w)
        return Plan(recipe, plugins, check_training(recipe, plugins))

    def trl_trainer(self, w: Workload, plan: Plan, out: Path):
        """Plain TRL with the same settings, models (dtypes) and data."""
        from peft import LoraConfig

        precision = run_precision(plan.recipe)
        tok = AutoTokenizer.from_pretrained(self.model_dir)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        policy_dtype = precision.compute if w.lora else precision.trained
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch_dtype(policy_dtype))
        peft = (LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                           target_modules=LORA["target_modules"], task_type="CAUSAL_LM") if w.lora else None)
        common = dict(model=model, processing_class=tok, peft_config=peft)
        if w.grpo:
            config = GRPOConfig(output_dir=str(out), seed=plan.recipe.seed, **trl_values(plan, precision))
            return GRPOTrainer(args=config, reward_funcs=[digit_share],
                               train_dataset=Dataset.from_list(self.data["prompts"]), **common)
        config = DPOConfig(output_dir=str(out), seed=plan.recipe.seed, **trl_values(plan, precision))
        reference = None
        if not w.lora:  # a frozen copy in the compute dtype, as posttrain's load_frozen_model
            reference = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch_dtype(precision.compute))
            reference.requires_grad_(False).eval()
        return DPOTrainer(args=config, ref_model=reference, train_dataset=Dataset.from_list(self.data["pairs"]),
                          **common)

    def check_lengths(self, trainer) -> None:
        """The tokenised DPO data is as long as asked: the prompt, and each response with its EOS."""
        ds = trainer.train_dataset
        prompt = set(map(len, ds["prompt_ids"]))
        responses = set(map(len, ds["chosen_ids"])) | set(map(len, ds["rejected_ids"]))
        if prompt != {self.sizes.prompt_tokens} or responses != {self.sizes.completion_tokens + 1}:
            raise RuntimeError(f"tokenised lengths are off: prompts {sorted(prompt)} (want {self.sizes.prompt_tokens}),"
                               f" responses {sorted(responses)} (want {self.sizes.completion_tokens + 1} with EOS)")

    def run(self, kind: str, w: Workload, repeat: int) -> dict:
        with fresh_llama_module():
            return self._run(kind, w, repeat)

    def _run(self, kind: str, w: Workload, repeat: int) -> dict:
        out = self.tmp / "runs" / f"{w.key}-{kind}-{repeat}"
        out.mkdir(parents=True)
        free_memory()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        plan = self.plan(w)
        set_seed(SEED)
        if kind == "posttrain":
            stage = online_stage if w.grpo else preference_stage
            trainer, _ = stage.build_trainer(plan, out)
        else:
            trainer = self.trl_trainer(w, plan, out)
        timer = StepTimer()
        trainer.add_callback(timer)
        generation = GenerationTimer(trainer) if w.grpo else None
        if not w.grpo:
            self.check_lengths(trainer)
        dtypes = weight_dtypes(trainer)
        checkpointing = bool(trainer.args.gradient_checkpointing)
        trainer.train()

        logs = [h for h in trainer.state.log_history if "loss" in h]
        seen = [h["num_tokens"] for h in logs if "num_tokens" in h]
        warm = slice(self.sizes.warmup, None) if len(timer.times) > self.sizes.warmup else slice(None)
        result = {
            "median_step_s": statistics.median(timer.times[warm]),
            "step_times_s": timer.times,
            "losses": [h["loss"] for h in logs],
            "tokens_per_step": seen[-1] / len(seen) if seen else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "dtypes": dtypes,
            "activation_checkpointing": checkpointing,
        }
        if generation is not None:
            gen_s, step_s = generation.seconds[warm], timer.times[warm]
            result.update({
                "rewards": [h.get("reward") for h in logs],
                "generation_share": sum(gen_s) / sum(step_s),
                "generated_tokens_per_step": sum(generation.tokens) / len(generation.tokens),
                "generated_tokens_per_s": sum(generation.tokens[warm]) / sum(gen_s),
            })
        trainer.accelerator.free_memory()
        del trainer
        free_memory()
        return result


@contextlib.contextmanager
def fresh_llama_module():
    """Run as in a fresh process: TRL's ``use_liger_kernel`` makes Liger replace functions and classes of
    transformers' Llama module (RoPE, RMSNorm, MLP) when training starts, for the whole process, so
    models built afterwards would start patched. Put them back after the run."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    forward = modeling_llama.LlamaForCausalLM.__dict__.get("forward")
    try:
        yield
    finally:
        for key, value in saved.items():
            if vars(modeling_llama).get(key) is not value:
                setattr(modeling_llama, key, value)
        if forward is not None and modeling_llama.LlamaForCausalLM.__dict__.get("forward") is not forward:
            modeling_llama.LlamaForCausalLM.forward = forward


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def weight_dtypes(trainer) -> dict:
    """The dtypes of the trained and the frozen weights, and of a separate reference model."""
    name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
    params = list(trainer.model.parameters())
    ref = getattr(trainer, "ref_model", None)
    return {"trained": sorted({name(p.dtype) for p in params if p.requires_grad}),
            "frozen": sorted({name(p.dtype) for p in params if not p.requires_grad}),
            "reference": sorted({name(p.dtype) for p in ref.parameters()}) if ref is not None else None}


# -- the report -----------------------------------------------------------------------------------

def liger_unavailable() -> str | None:
    """Why TRL's use_liger_kernel cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device: Liger's kernels are Triton GPU kernels"
    try:
        import liger_kernel  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means no Liger
        return f"liger_kernel does not import ({type(e).__name__}: {e}); pip install 'posttrain[gpu]'"
    return None


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(given: float | None) -> tuple[float | None, str]:
    """The bf16 dense peak to measure MFU against, and where it came from (or why there is none)."""
    if given is not None:
        return given, "--peak-tflops"
    if not torch.cuda.is_available():
        return None, "no CUDA device: MFU is measured against a GPU's bf16 dense peak (--peak-tflops to give one)"
    name = torch.cuda.get_device_name(0).lower()
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"known peak of '{key}' (bench/gpu.py PEAK_BF16_TFLOPS)"
    return None, f"no known bf16 peak for '{torch.cuda.get_device_name(0)}': pass --peak-tflops"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for package in ("posttrain", "torch", "trl", "transformers", "peft", "accelerate", "liger-kernel"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    out["cuda"] = torch.version.cuda
    return out


def summarize(w: Workload, results: dict, trl_step: float, ours_step: float, model: dict, peak: tuple,
              sizes: Sizes) -> dict:
    """One workload's entry of the report, from both sides' runs (losses and rewards of the first repeat)."""
    trl_run, our_run = results["trl"][0], results["posttrain"][0]
    n = model["matmul_parameters"]
    tokens = {kind: runs[0]["tokens_per_step"] for kind, runs in results.items()}
    step = {"trl": trl_step, "posttrain": ours_step}
    flops = {kind: 8 * n * tokens[kind] if tokens[kind] else None for kind in step}
    tflops, peak_source = peak
    entry = {
        "workload": w.name,
        "liger": w.liger,
        "method": "GRPO" if w.grpo else "DPO",
        "lora": w.lora,
        "posttrain_median_step_s": round(ours_step, 4),
        "trl_median_step_s": round(trl_step, 4),
        "step_time_ratio": round(ours_step / trl_step, 4),
        "posttrain_step_s_per_repeat": [round(r["median_step_s"], 4) for r in results["posttrain"]],
        "trl_step_s_per_repeat": [round(r["median_step_s"], 4) for r in results["trl"]],
        "posttrain_tokens_per_step": tokens["posttrain"],
        "trl_tokens_per_step": tokens["trl"],
        "posttrain_tokens_per_s": round(tokens["posttrain"] / ours_step, 1) if tokens["posttrain"] else None,
        "trl_tokens_per_s": round(tokens["trl"] / trl_step, 1) if tokens["trl"] else None,
        "flops_per_step": flops["posttrain"],
        "flops_formula": (
            "8*N*T: 6*N*T to train on the T prompt+completion tokens, 2*N*T to generate them (prefill + decode); "
            "no reference at beta 0" if w.grpo else
            "8*N*T: policy forward+backward 6*N*T, reference forward 2*N*T" + (
                " (LoRA counted as full FT: its backward skips the frozen weights' gradients, so this overstates "
                "its work)" if w.lora else "")) + f"; N = {n} parameters in matmuls (all but the input embedding), "
                                                 "T = tokens of the step as TRL counts them; attention not counted",
        "posttrain_mfu": (round(flops["posttrain"] / ours_step / (tflops * 1e12), 4)
                          if tflops and flops["posttrain"] else None),
        "trl_mfu": round(flops["trl"] / trl_step / (tflops * 1e12), 4) if tflops and flops["trl"] else None,
        "mfu_note": f"against {tflops} TFLOP/s ({peak_source})" if tflops else peak_source,
        "posttrain_peak_memory_gib": peak_gib(results["posttrain"]),
        "trl_peak_memory_gib": peak_gib(results["trl"]),
        "memory_note": ("torch.cuda.max_memory_allocated, reset before each run (model loading included); the "
                        "largest of the repeats" if torch.cuda.is_available() else
                        "no CUDA device: torch.cuda.max_memory_allocated measures GPU memory only"),
        "posttrain_first_loss": our_run["losses"][0],
        "trl_first_loss": trl_run["losses"][0],
        "first_loss_difference": abs(our_run["losses"][0] - trl_run["losses"][0]),
        "max_abs_loss_difference": max(abs(a - b) for a, b in zip(our_run["losses"], trl_run["losses"])),
        "posttrain_losses": our_run["losses"],
        "trl_losses": trl_run["losses"],
        "dtypes": {"posttrain": our_run["dtypes"], "trl": trl_run["dtypes"]},
    }
    if not w.grpo:
        entry["tokens_per_step_expected"] = 2 * sizes.pairs * (sizes.prompt_tokens + sizes.completion_tokens)
    else:
        share = {kind: statistics.median(r["generation_share"] for r in runs) for kind, runs in results.items()}
        rate = {kind: statistics.median(r["generated_tokens_per_s"] for r in runs) for kind, runs in results.items()}
        entry.update({
            "posttrain_generation_share": round(share["posttrain"], 4),
            "trl_generation_share": round(share["trl"], 4),
            "posttrain_generated_tokens_per_step": our_run["generated_tokens_per_step"],
            "trl_generated_tokens_per_step": trl_run["generated_tokens_per_step"],
            "posttrain_generated_tokens_per_s": round(rate["posttrain"], 1),
            "trl_generated_tokens_per_s": round(rate["trl"], 1),
            "generation_note": "the trainer's _generate_single_turn timed with the GPU synchronised at both ends, one "
                               "call per step; share = generation time / step time over the steps after warm-up; "
                               "tokens/s per second of generation",
            "posttrain_first_reward": our_run["rewards"][0],
            "trl_first_reward": trl_run["rewards"][0],
            "max_abs_reward_difference": max((abs(a - b) for a, b in zip(our_run["rewards"], trl_run["rewards"])
                                              if a is not None and b is not None), default=None),
            # the prompts' tokens by design, the completions' as generated
            "tokens_per_step_expected": (sizes.grpo_prompts * sizes.grpo_generations * sizes.grpo_prompt_tokens
                                         + our_run["generated_tokens_per_step"]),
        })
    return entry


def peak_gib(runs: list[dict]) -> float | None:
    peaks = [r["peak_memory_bytes"] for r in runs if r["peak_memory_bytes"] is not None]
    return round(max(peaks) / GIB, 3) if peaks else None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few short steps (CPU, under a minute)")
    parser.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--liger", choices=("both", "on", "off"), default="both",
                        help="runs with TRL's use_liger_kernel, without, or both (default)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 10; smoke 4)")
    parser.add_argument("--repeats", type=int, help="alternating repeats per side (default 2; smoke 1)")
    parser.add_argument("--out", help="also write the JSON report to this file")
    parser.add_argument("--tokenizer", help="tokenizer folder for the full-size model (default: SmolLM2's, cached)")
    parser.add_argument("--peak-tflops", type=float, help="bf16 dense peak of the device for MFU (TFLOP/s)")
    parser.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto",
                        help="activation checkpointing on both sides (auto: posttrain's default, on on a GPU)")
    parser.add_argument("--prompt-tokens", type=int, help="DPO prompt tokens (default 512)")
    parser.add_argument("--completion-tokens", type=int, help="DPO tokens of each response (default 512)")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in WORKLOADS]
    if unknown or not only:
        parser.error(f"--only: unknown workload(s) {', '.join(unknown) or '(none given)'}; choose from "
                     f"{', '.join(WORKLOADS)}")
    args.only = only
    sizes = SMOKE if args.smoke else Sizes()
    overrides = {"steps": args.steps, "repeats": args.repeats, "prompt_tokens": args.prompt_tokens,
                 "completion_tokens": args.completion_tokens}
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    if sizes.steps < 1 or sizes.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    return args, sizes


def main(argv=None) -> int:
    args, sizes = parse_args(argv)
    stdout = sys.stdout
    report: dict = {}
    failed = False
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON report, whatever the libraries print
        started = time.perf_counter()
        if not args.smoke and not torch.cuda.is_available():
            print("bench/gpu.py: no CUDA device: the 0.5B workloads are slow on a CPU (--smoke for a quick check)")
        with tempfile.TemporaryDirectory(prefix="posttrain-bench-gpu-", dir=temp_root(model_bytes(sizes))) as tmp:
            tmp = Path(tmp)
            model = build_model(tmp / "model", sizes, args.smoke, tokenizer_source(args.tokenizer))
            data = build_data(tmp, tmp / "model", sizes, sizes.steps)
            bench = Bench(tmp, tmp / "model", data, sizes, args.checkpointing)
            peak = peak_tflops(args.peak_tflops)
            precision = run_precision(bench.plan(Workload(args.only[0], False)).recipe)
            flags = {"both": (False, True), "on": (True,), "off": (False,)}[args.liger]
            # the runs without Liger first (each run undoes Liger's global patches: fresh_llama_module)
            order = [Workload(name, liger) for liger in flags for name in args.only]
            workloads, checkpointing = {}, None
            no_liger = liger_unavailable()
            for w in order:
                if w.liger and no_liger:
                    workloads[w.key] = {"workload": w.name, "liger": True, "skipped": no_liger}
                    continue
                print(f"bench/gpu.py: {w.key} ({sizes.repeats} x posttrain and TRL, {sizes.steps} steps)", flush=True)
                try:
                    results, trl_step, ours_step = alternate(lambda kind, i: bench.run(kind, w, i), sizes.repeats)
                except Exception as e:  # noqa: BLE001 - report the failure, go on with the other workloads
                    traceback.print_exc()
                    workloads[w.key] = {"workload": w.name, "liger": w.liger, "error": f"{type(e).__name__}: {e}"}
                    failed = True
                    continue
                workloads[w.key] = summarize(w, results, trl_step, ours_step, model, peak, sizes)
                checkpointing = results["posttrain"][0]["activation_checkpointing"]
            report = {
                "benchmark": "bench/gpu.py: posttrain vs plain TRL, same workload, one process, alternating runs",
                "device": device_name(),
                "cuda": torch.cuda.is_available(),
                "versions": versions(),
                "settings": {
                    "smoke": args.smoke,
                    "workloads": args.only,
                    "liger": args.liger,
                    "steps": sizes.steps,
                    "warmup_steps": sizes.warmup,
                    "repeats": sizes.repeats,
                    "seed": SEED,
                    "model": model,
                    "precision": {"compute": precision.compute, "trained": precision.trained,
                                  "frozen": precision.compute},
                    "activation_checkpointing": checkpointing,
                    "checkpointing_option": args.checkpointing,
                    "dpo": {"pairs": sizes.pairs, "prompt_tokens": sizes.prompt_tokens,
                            "completion_tokens": sizes.completion_tokens,
                            "max_length": sizes.prompt_tokens + sizes.completion_tokens, "beta": BETA,
                            "loss": "sigmoid", "learning_rate": {"full": 1e-5, "lora": 1e-4}},
                    "grpo": {"prompts": sizes.grpo_prompts, "generations": sizes.grpo_generations,
                             "prompt_tokens": sizes.grpo_prompt_tokens, "new_tokens": sizes.new_tokens, "beta": 0.0,
                             "reward": "digit share of the completion (bench/online.py)", "learning_rate": 1e-4},
                    "lora": LORA,
                    "words": data["words"],
                    "peak_tflops": peak[0],
                    "peak_tflops_source": peak[1],
                },
                "workloads": workloads,
                "total_seconds": round(time.perf_counter() - started, 1),
            }
    text = json.dumps(report, indent=2)
    print(text, file=stdout)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
