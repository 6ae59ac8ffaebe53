"""Sampling from the policy: the ``posttrain_sample`` owner, else the default sampler
(``model.generate``), seeded.

Every place posttrain samples (iterative rounds, rejection sampling, held-out answers) goes through
:func:`sample` with a seed derived from the recipe's ``seed`` and where it samples
(:func:`derive_seed`), and the sampling runs on a forked random state seeded with it: the same
recipe and seed give the same samples on a CPU, and sampling leaves the training's random state as
it was.
"""

from __future__ import annotations

import contextlib
import hashlib

from .registry import PluginSet


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


def default_sample(model, tokenizer, prompts: list, num_samples: int, generation: dict, batch_size: int = 16):
    import torch

    texts = [_render(tokenizer, p) for p in prompts]
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    out: list[list[str]] = []
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
            decoded = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out.extend(decoded[i * num_samples:(i + 1) * num_samples] for i in range(len(chunk)))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


def sample(plugins: PluginSet, model, tokenizer, prompts: list, num_samples: int, generation: dict,
           seed: int | None = None):
    """Completions from the plugin that owns ``posttrain_sample``, else from the default sampler, with
    torch's random state seeded with ``seed`` for the call (see :func:`seeded`)."""
    prompts = list(prompts)
    with seeded(seed, model):
        result = plugins.call("posttrain_sample", model=model, tokenizer=tokenizer, prompts=prompts,
                              num_samples=num_samples, generation=generation)
        if result is None:
            result = default_sample(model, tokenizer, prompts, num_samples, generation)
    return result
