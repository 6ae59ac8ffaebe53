"""The default sampler: ``model.generate``, used when no plugin owns ``posttrain_sample``."""

from __future__ import annotations

from .registry import PluginSet


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


def sample(plugins: PluginSet, model, tokenizer, prompts: list, num_samples: int, generation: dict):
    """Completions from the plugin that owns ``posttrain_sample``, else from the default sampler."""
    result = plugins.call("posttrain_sample", model=model, tokenizer=tokenizer, prompts=prompts,
                          num_samples=num_samples, generation=generation)
    if result is None:
        result = default_sample(model, tokenizer, prompts, num_samples, generation)
    return result
