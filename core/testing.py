"""Helpers for plugin authors' tests (and posttrain's own tests and benchmarks).

- ``build_tiny_model`` / the ``tiny_model_dir`` fixture: a random Llama and a byte-level BPE
  tokenizer trained here (with a ChatML chat template), saved to a folder: a real model class and
  a real tokenizer, offline, well under a second per training step.
- ``make_logps``: a batch of :class:`~posttrain.types.PreferenceLogps` with consistent
  per-token and per-sequence values, to test a loss formula by hand.
- ``make_rollouts``: a :class:`~posttrain.types.Rollouts` batch around given rewards, to test an
  advantage estimator or transform by hand.
- ``run_recipe``: run a recipe (a dict or a file, preference or online) for a few steps on the
  tiny model and return its summary, the one-call "does my plugin train" check.
- ``assert_plugin_conforms``: the plugin's hooks match the specs, its options schema is valid.

Use the fixtures from your ``conftest.py`` with ``pytest_plugins = ["posttrain.testing"]``.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(folder: str | Path, *, hidden: int = 64, layers: int = 2, vocab: int = 600,
                     intermediate: int | None = None, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> Path:
    """Save a random ``LlamaForCausalLM`` and its tokenizer to ``folder`` and return the path."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .builtin.arithmetic import ArithmeticOptions, arithmetic

    corpus = []
    for r in arithmetic(ArithmeticOptions(n=400, seed=123)):
        corpus += [r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]]
    corpus += ["Question: Answer: user assistant system"] * 5
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=intermediate or hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def make_logps(batch: int = 4, length: int = 6, *, seed: int = 0, reference: bool = True, gold: bool = False,
               requires_grad: bool = False):
    """A random but self-consistent PreferenceLogps: sequence log-probs are the sums of the
    per-token ones under the masks, lengths are the mask sums. The log-probs are float64, so a
    hand computation can be compared to ~1e-12."""
    import torch

    from .types import PreferenceLogps

    g = torch.Generator().manual_seed(seed)

    def block():
        lengths = torch.randint(1, length + 1, (batch,), generator=g)
        mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
        tokens = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3 * mask
        tokens.requires_grad_(requires_grad)
        return tokens, mask

    (ct, cm), (rt, rm) = block(), block()

    def ref_of(tokens, mask):  # the reference's per-token log-probs: the policy's, moved a little
        noise = torch.randn(tokens.shape, generator=g, dtype=torch.float64) * 0.3
        return ((tokens.detach() + noise).clamp(max=-1e-3)) * mask if reference else None

    rct, rrt = ref_of(ct, cm), ref_of(rt, rm)
    lp = PreferenceLogps(
        chosen_logps=ct.sum(1), rejected_logps=rt.sum(1),
        ref_chosen_logps=rct.sum(1) if reference else None,
        ref_rejected_logps=rrt.sum(1) if reference else None,
        chosen_lengths=cm.sum(1), rejected_lengths=rm.sum(1),
        chosen_token_logps=ct, rejected_token_logps=rt, chosen_mask=cm, rejected_mask=rm,
        ref_chosen_token_logps=rct, ref_rejected_token_logps=rrt)
    if gold:
        gt, gm = block()
        lp.gold_token_logps, lp.gold_mask, lp.gold_logps, lp.gold_lengths = gt, gm, gt.sum(1), gm.sum(1)
    return lp


def make_rollouts(rewards, group_size: int, *, sources: dict | None = None, completion_length: int = 5,
                  seed: int = 0):
    """A :class:`~posttrain.types.Rollouts` batch around the given rewards (a list, None = unscorable),
    to test an advantage plugin by hand. Single process: every row is local."""
    import torch

    from .types import Rollouts

    values = torch.tensor([float("nan") if r is None else float(r) for r in rewards], dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, completion_length + 1, (len(values),), generator=g)
    mask = (torch.arange(completion_length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return Rollouts(rewards=values, rewards_by_source=sources or {"reward": values.clone()}, group_size=group_size,
                    completion_mask=mask, local=slice(0, len(values)), prompts=[f"p{i // group_size}" for i in
                                                                                range(len(values))],
                    completions=[""] * len(values), gather=lambda t: t)


_TINY: dict[str, Path] = {}


def tiny_model() -> Path:
    """The tiny model folder, built once per process in a temporary directory."""
    if "path" not in _TINY:
        _TINY["path"] = build_tiny_model(Path(tempfile.mkdtemp(prefix="posttrain-tiny-")) / "model")
    return _TINY["path"]


def run_recipe(recipe: dict | str | Path, *, steps: int = 3, output_dir: str | Path | None = None,
               overrides: list[str] = ()) -> dict:
    """Run a recipe for ``steps`` optimizer steps and return its summary.

    A dict recipe may leave out ``model`` (the tiny model with LoRA is used) and ``data`` (96
    built-in arithmetic pairs; 64 word problems for ``stage: online``). Small batch and logging
    settings are filled in unless given.
    Raises ``posttrain.UserError`` for recipe problems, like the CLI would report them.
    """
    import yaml

    from .runner import run

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if isinstance(recipe, dict):
        data = copy.deepcopy(recipe)
        online = data.get("stage") == "online"
        data.setdefault("model", {"name_or_path": str(tiny_model()), "lora": {"r": 8, "alpha": 16}})
        data.setdefault("data", {"source": "builtin:word_problems", "options": {"n": 64}, "eval": {"fraction": 0.25}}
                        if online else
                        {"source": "builtin:arithmetic", "options": {"n": 96}, "eval": {"fraction": 0.25}})
        training = data.setdefault("training", {})
        defaults = {"per_device_train_batch_size": 8, "logging_steps": 1, "learning_rate": 5e-3, "save_strategy": "no"}
        defaults.update({"num_generations": 4, "max_completion_length": 16} if online else
                        {"per_device_eval_batch_size": 8, "max_length": 64})
        for key, value in defaults.items():
            training.setdefault(key, value)
        data.setdefault("eval", {"generate": 0})
        folder = Path(tempfile.mkdtemp(prefix="posttrain-recipe-"))
        path = folder / "recipe.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path = Path(recipe)
    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="posttrain-run-")) / "run"
    _, summary = run(str(path), [*overrides, f"training.max_steps={steps}"], str(out))
    summary["metrics"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return summary


def assert_plugin_conforms(cls: Any) -> None:
    """Fail with every problem found: hooks that match no spec or ask for arguments the hook does
    not pass, a missing name/description, an options schema that cannot be built or listed."""
    import dataclasses

    from .registry import check_plugin_class

    problems = []
    try:
        hooks = check_plugin_class(cls)
        if not hooks:
            problems.append("implements no hook")
    except ValueError as e:
        problems.append(str(e))
    if not getattr(cls, "description", ""):
        problems.append("has no description (shown by `posttrain plugins`)")
    options = getattr(cls, "Options", None)
    if options is None or not dataclasses.is_dataclass(options):
        problems.append("Options is not a dataclass")
    else:
        try:
            schema = cls.options_schema()
            required = [o["name"] for o in schema if o["required"]]
            if not required:
                cls(cls.parse_options({}, where=f"plugins.{cls.name}"))
        except Exception as e:  # noqa: BLE001 - reported as a conformance problem
            problems.append(f"options schema: {type(e).__name__}: {e}")
    if problems:
        raise AssertionError(f"plugin {getattr(cls, '__name__', cls)!r} does not conform: " + "; ".join(problems))


try:  # fixtures for plugin authors' tests: `pytest_plugins = ["posttrain.testing"]`
    import pytest

    @pytest.fixture(scope="session")
    def tiny_model_dir() -> Path:
        """Folder of the tiny random Llama and its tokenizer."""
        return tiny_model()

    @pytest.fixture
    def preference_logps() -> Any:
        """A random, self-consistent PreferenceLogps batch (4 pairs, reference included)."""
        return make_logps()
except ImportError:  # pytest is only needed for the fixtures
    pass
