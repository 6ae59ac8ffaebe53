"""Sampling from the policy: the ``posttrain_sample`` owner, else the default sampler
(``model.generate``), seeded.

Every place posttrain samples (iterative rounds, rejection sampling, held-out answers) goes through
:func:`sample_completions` (the texts, with their token ids and truncation flags for the reward
sources) with a seed derived from the recipe's ``seed`` and where it samples (:func:`derive_seed`),
and the sampling runs on a forked random state seeded with it: the same recipe and seed give the
same samples on a CPU, and sampling leaves the training's random state as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

from .plugin_set import PluginSet


def derive_seed(base: int, *parts) -> int:
    """A seed for one use of the recipe's seed (``derive_seed(seed, "round", 2)``): stable across runs,
    machines and Python versions, different for different parts."""
    digest = hashlib.sha256(repr((int(base), *parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@contextlib.contextmanager
def seeded(seed: int | None, model=None):
    """torch's random state forked and seeded with ``seed`` (the CPU's, and the model's GPU's); restored on
    exit. ``None``: the current state, untouched."""
    if seed is None:
        yield
        return
    import torch

    devices = []
    if model is not None and torch.cuda.is_available():
        device = next(model.parameters()).device
        if device.type == "cuda":
            devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _render(tokenizer, prompt) -> str:
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


@dataclass
class Samples:
    """Completions, ``num_samples`` per prompt: ``texts[i][j]`` the j-th completion of prompt i,
    ``ids[i][j]`` its token ids as generated (through the EOS token that ended it, or up to
    ``max_new_tokens`` without one) and ``truncated[i][j]`` whether it was cut at ``max_new_tokens``
    (its ids do not end with EOS)."""

    texts: list[list[str]]
    ids: list[list[list[int]]]
    truncated: list[list[bool]]


def eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end a completion, as TRL's GRPOTrainer takes them: the generation config's EOS tokens
    and the tokenizer's."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return {*ids, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}


def _cut(row: list[int], stop: set[int]) -> tuple[list[int], bool]:
    """A generated row (padded after its end) through its first EOS token, and whether it has none."""
    end = next((i for i, token in enumerate(row) if token in stop), None)
    return (row, True) if end is None else (row[:end + 1], False)


def default_generate(model, tokenizer, prompts: list, num_samples: int, generation: dict,
                     batch_size: int = 16) -> Samples:
    """``model.generate``'s completions of ``prompts`` with their token ids and truncation flags."""
    import torch

    texts = [_render(tokenizer, p) for p in prompts]
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    stop = eos_ids(model, tokenizer)
    out = Samples([], [], [])
    try:
        device = next(model.parameters()).device
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            # A chat template already writes any BOS token; plain prompts get the tokenizer's specials, as in
            # TRL's tokenisation of plain preference data.
            enc = tokenizer(chunk, return_tensors="pt", padding=True,
                            add_special_tokens=not isinstance(prompts[0], list)).to(device)
            with torch.no_grad():
                ids = model.generate(**enc, num_return_sequences=num_samples, pad_token_id=tokenizer.pad_token_id,
                                     **generation)
            cut = [_cut(row, stop) for row in ids[:, enc["input_ids"].shape[1]:].tolist()]
            decoded = tokenizer.batch_decode([row for row, _ in cut], skip_special_tokens=True)
            for i in range(len(chunk)):
                group = slice(i * num_samples, (i + 1) * num_samples)
                out.texts.append(decoded[group])
                out.ids.append([row for row, _ in cut[group]])
                out.truncated.append([truncated for _, truncated in cut[group]])
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


def default_sample(model, tokenizer, prompts: list, num_samples: int, generation: dict, batch_size: int = 16):
    """``model.generate``'s completions of ``prompts``: ``num_samples`` texts per prompt."""
    return default_generate(model, tokenizer, prompts, num_samples, generation, batch_size).texts


def tokenized(tokenizer, texts: list[list[str]], max_new_tokens: int | None) -> Samples:
    """A sampler plugin's texts with token ids as TRL makes them of a sampler's text online: tokenised with no
    special tokens added, then EOS, unless they reach ``max_new_tokens`` tokens (truncated)."""
    out = Samples([list(map(str, group)) for group in texts], [], [])
    for group in out.texts:
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in group]
        cut = [max_new_tokens is not None and len(row) >= max_new_tokens for row in ids]
        out.ids.append([row if truncated else [*row, tokenizer.eos_token_id] for row, truncated in zip(ids, cut)])
        out.truncated.append(cut)
    return out


def sample_completions(plugins: PluginSet, model, tokenizer, prompts: list, num_samples: int, generation: dict,
                       seed: int | None = None) -> Samples:
    """Completions from the plugin that owns ``posttrain_sample``, else from the default sampler, with their
    token ids and truncation flags, and torch's random state seeded with ``seed`` for the call (see
    :func:`seeded`)."""
    prompts = list(prompts)
    with seeded(seed, model):
        result = plugins.call("posttrain_sample", model=model, tokenizer=tokenizer, prompts=prompts,
                              num_samples=num_samples, generation=generation)
        if result is None:
            return default_generate(model, tokenizer, prompts, num_samples, generation)
    return tokenized(tokenizer, result, generation.get("max_new_tokens"))

