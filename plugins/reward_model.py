"""A learned reward model as a reward source: r(x, y) from a sequence classifier with one output.

The model is given by ``model``: a folder (a ``reward_model`` stage's ``merged/`` or ``final/``
output, or any ``AutoModelForSequenceClassification`` checkpoint with one label, LoRA adapters
included), a hub id from the local cache, or ``stages.NAME``, an earlier reward_model stage of the
same pipeline. Loading, rendering and batching are ``posttrain.classifier.SequenceClassifier``'s:
once, frozen, on the policy's device, in the compute dtype, with the reward model's own tokenizer
and chat template, inputs rendered as the reward_model stage rendered its pairs.

Normalisation (optional): ``normalize: {mean: m, std: s}`` gives (r - m) / s; ``normalize: heldout``
takes m and s from ``reward_stats.json`` next to the model, which the reward_model stage writes from
its held-out responses. ``clip: c`` then clips to [-c, c]. A reward model is identified only up to a
per-prompt shift, so normalising matters when it is combined with a verifier by weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from posttrain import Plugin, UserError, hookimpl
from posttrain.classifier import SequenceClassifier, check_model_folder, check_normalize, normalization


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
            if self.clip is not None and self.clip <= 0:
                raise ValueError("clip must be positive")
            check_model_folder(self.model)
            check_normalize(self.model, self.normalize)

    def __init__(self, options=None):
        super().__init__(options)
        o = self.options
        self.classifier = SequenceClassifier(o.model, dtype=o.dtype, batch_size=o.batch_size, max_length=o.max_length,
                                             field="plugins.reward_model.model", what="reward model")
        self._shift, self._scale = None, None

    def load(self):
        """The reward model and its tokenizer (loaded on first use), and the normalisation."""
        model, tokenizer = self.classifier.load()
        if int(getattr(model.config, "num_labels", 1)) != 1:
            raise UserError(f"'{self.options.model}' has {model.config.num_labels} outputs; a reward model has one",
                            field="plugins.reward_model.model", fix="point at a reward model (a reward_model stage's "
                                                                    "output); for a classifier use the safety plugin")
        if self._shift is None:
            self._shift, self._scale = normalization(self.options.model, self.options.normalize)
        return model, tokenizer

    def raw_scores(self, prompts: list, completions: list) -> list[float]:
        """r(x, y) for each pair, before normalisation."""
        self.load()
        return self.classifier.logits(prompts, completions)[:, 0].tolist()

    @hookimpl
    def posttrain_reward(self, prompts, completions):
        scores = [(s - self._shift) / self._scale for s in self.raw_scores(prompts, completions)]
        if self.options.clip is not None:
            c = self.options.clip
            scores = [min(c, max(-c, s)) for s in scores]
        return scores
