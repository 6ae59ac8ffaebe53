"""Mask formatting tokens out of the preference loss (a Llama 3 DPO trick).

Special and chat-template tokens that appear in both responses of a pair (end-of-turn markers,
role headers, ...) carry no preference, yet their log-probs enter both sides of the margin and
the gradient. This plugin removes them from the loss: a token is masked when its id is a format
id (the tokenizer's special tokens, plus ``extra_tokens``) and the same id also occurs in the
other response of the pair. Everything else stays, including format ids that only one
response has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import Plugin, hookimpl


class MaskFormatTokens(Plugin):
    name = "mask_format_tokens"
    description = "removes special/template tokens shared by both responses of a pair from the loss (token mask)"
    stages = ("preference",)  # it compares the two responses of a pair, which only this stage's batches hold

    @dataclass
    class Options:
        extra_tokens: list[str] = field(default_factory=list, metadata={
            "help": "More tokens to treat as formatting, by their token string (e.g. '<|eot_id|>', 'assistant')."})
        include_special: bool = field(default=True, metadata={"help": "Treat the tokenizer's special tokens as formatting."})

    def __init__(self, options=None):
        super().__init__(options)
        self._ids = None

    def format_ids(self, tokenizer) -> list[int]:
        if self._ids is None:
            ids = set(tokenizer.all_special_ids) if self.options.include_special else set()
            for token in self.options.extra_tokens:
                token_id = tokenizer.convert_tokens_to_ids(token)
                if token_id is None or token_id == tokenizer.unk_token_id:
                    raise ValueError(f"extra token {token!r} is not a single token of this tokenizer")
                ids.add(token_id)
            self._ids = sorted(ids)
        return self._ids

    @hookimpl
    def posttrain_token_mask(self, input_ids, completion_mask, tokenizer):
        import torch

        format_ids = torch.tensor(self.format_ids(tokenizer), device=input_ids.device, dtype=input_ids.dtype)
        is_format = torch.isin(input_ids, format_ids) & completion_mask.bool()
        pairs = input_ids.shape[0] // 2
        drop = torch.zeros_like(is_format)
        for i in range(pairs):
            chosen, rejected = i, pairs + i
            shared = set(input_ids[chosen][is_format[chosen]].tolist()) & set(
                input_ids[rejected][is_format[rejected]].tolist())
            if shared:
                shared_ids = torch.tensor(sorted(shared), device=input_ids.device, dtype=input_ids.dtype)
                for row in (chosen, rejected):
                    drop[row] = is_format[row] & torch.isin(input_ids[row], shared_ids)
        return (~drop).to(completion_mask.dtype)
