"""A learned reward model as a reward source: r(x, y) from a sequence classifier with one output.

The model is given by ``model``: a folder (a ``reward_model`` stage's ``merged/`` or ``final/``
output, or any ``AutoModelForSequenceClassification`` checkpoint with one label, LoRA adapters
included), a hub id from the local cache, or ``stages.NAME``, an earlier reward_model stage of the
same pipeline. It is loaded once, on first use, with its own tokenizer and chat template, on the
device the policy trains on (``cuda:LOCAL_RANK`` when a GPU is there, else the CPU), in the compute
dtype (``dtype: auto``: bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on a CPU),
frozen and in eval mode; completions are scored in batches of ``batch_size`` without gradients.

Each (prompt, completion) is rendered the way the reward_model stage rendered its training pairs
(TRL's RewardTrainer): a conversation (message lists) through the reward model's chat template;
plain text as prompt + completion + EOS. Longer inputs keep their last ``max_length`` tokens (the
head reads the last token).

Normalisation (optional): ``normalize: {mean: m, std: s}`` gives (r - m) / s; ``normalize: heldout``
takes m and s from ``reward_stats.json`` next to the model, which the reward_model stage writes from
its held-out responses. ``clip: c`` then clips to [-c, c]. A reward model is identified only up to a
per-prompt shift, so normalising matters when it is combined with a verifier by weight.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from posttrain import Plugin, UserError, hookimpl

STATS_FILE = "reward_stats.json"


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists()


class RewardModel(Plugin):
    name = "reward_model"
    description = "reward from a learned reward model (a path, a hub id or an earlier pipeline stage), batched"

    @dataclass
    class Options:
        model: str = field(metadata={"help": "The reward model: a folder, a hub id, or stages.NAME (an earlier "
                                             "reward_model stage of the pipeline)."})
        weight: float = field(default=1.0, metadata={"help": "Weight of this source when rewards are combined."})
        batch_size: int = field(default=8, metadata={"help": "Completions scored per forward pass."})
        max_length: int = field(default=1024, metadata={"help": "Tokens per scored input (the last ones are kept)."})
        normalize: Union[Literal["heldout"], dict[str, float], None] = field(default=None, metadata={
            "help": "null: raw scores; {mean, std}: (r - mean) / std; heldout: mean and std from the model's "
                    "reward_stats.json (written by the reward_model stage)."})
        clip: Union[float, None] = field(default=None, metadata={
            "help": "Clip the (normalised) reward to [-clip, clip]."})
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
            "help": "Dtype the reward model computes in; auto: the compute dtype (bf16 on a GPU, float32 on a CPU)."})

        def validate(self):
            if self.batch_size < 1 or self.max_length < 2:
                raise ValueError("batch_size must be >= 1 and max_length >= 2")
            if isinstance(self.normalize, dict):
                if set(self.normalize) != {"mean", "std"} or self.normalize["std"] <= 0:
                    raise ValueError("normalize must be {mean: number, std: positive number} or 'heldout'")
            if self.clip is not None and self.clip <= 0:
                raise ValueError("clip must be positive")
            if self.model.startswith("stages.") or not _is_local(self.model):
                return  # a pipeline stage (made before this one runs) or a hub id
            folder = Path(self.model).expanduser()
            if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
                raise ValueError(f"'{self.model}' is not a model folder (no config.json or adapter_config.json)")
            if self.normalize == "heldout" and not (folder / STATS_FILE).is_file():
                raise ValueError(f"normalize: heldout needs {STATS_FILE} in '{self.model}' (the reward_model stage "
                                 "writes it); give normalize: {mean, std} instead")

    def __init__(self, options=None):
        super().__init__(options)
        self._model = self._tokenizer = None
        self._shift, self._scale = 0.0, 1.0

    # -- loading --------------------------------------------------------------------------------

    def _device_and_dtype(self):
        import torch

        cuda = torch.cuda.is_available()
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
        dtype = self.options.dtype
        if dtype == "auto":
            dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if cuda else "float32"
        return device, getattr(torch, dtype)

    def load(self):
        """The reward model and its tokenizer (loaded on first use)."""
        if self._model is not None:
            return self._model, self._tokenizer
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from posttrain.models import resolve_model_path

        path = resolve_model_path(self.options.model)
        device, dtype = self._device_and_dtype()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            if (Path(path) / "adapter_config.json").is_file():
                from peft import AutoPeftModelForSequenceClassification

                model = AutoPeftModelForSequenceClassification.from_pretrained(path, dtype=dtype, num_labels=1)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, num_labels=1)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the reward model '{path}': {str(e).splitlines()[0] if str(e) else e}",
                            field="plugins.reward_model.model",
                            fix="point at a reward model folder (a reward_model stage's merged/ or final/)") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        model.requires_grad_(False)
        self._model, self._tokenizer = model.to(device).eval(), tokenizer
        norm = self.options.normalize
        if norm == "heldout":
            stats = json.loads((Path(path) / STATS_FILE).read_text())
            norm = {"mean": stats["mean"], "std": stats["std"]}
        if norm:
            self._shift, self._scale = float(norm["mean"]), float(norm["std"])
        return self._model, self._tokenizer

    # -- scoring --------------------------------------------------------------------------------

    def token_ids(self, prompt, completion) -> list[int]:
        """The reward model's input for one (prompt, completion), rendered as its training pairs were."""
        from trl.data_utils import _tokenize

        _, tokenizer = self.load()
        if isinstance(prompt, list):  # a conversation: the reward model's chat template
            reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": str(completion)}]
            ids = _tokenize(tokenizer, prompt + reply)["input_ids"]
        else:
            text = str(prompt) + (completion if isinstance(completion, str) else str(completion))
            if not text.endswith(tokenizer.eos_token):
                text += tokenizer.eos_token
            ids = _tokenize(tokenizer, text)["input_ids"]
        return ids[-self.options.max_length:]

    def raw_scores(self, prompts: list, completions: list) -> list[float]:
        """r(x, y) for each pair, before normalisation."""
        import torch

        model, tokenizer = self.load()
        device = next(model.parameters()).device
        scores: list[float] = []
        inputs = [self.token_ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        for start in range(0, len(inputs), self.options.batch_size):
            chunk = inputs[start:start + self.options.batch_size]
            width = max(len(ids) for ids in chunk)
            # right padding: the classifier head reads the last non-padding token
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, row in enumerate(chunk):
                ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
            with torch.no_grad():
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            scores += out.squeeze(-1).float().tolist()
        return scores

    @hookimpl
    def posttrain_reward(self, prompts, completions):
        scores = [(s - self._shift) / self._scale for s in self.raw_scores(prompts, completions)]
        if self.options.clip is not None:
            c = self.options.clip
            scores = [min(c, max(-c, s)) for s in scores]
        return scores
