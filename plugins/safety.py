"""Safety as a reward source: a rule judge for the built-in safety task, or a safety classifier.

Either way it scores α for a safe completion, so that fresh samples can be labelled for safety
(iterative DPO, rejection sampling), online RL can optimise it, and a preference run reports the
safety rate of its held-out greedy answers (the mean of this source's scores with α = 1).

- ``rule: builtin`` (the default when no ``model`` is given): the rule judge of the built-in
  safety task (``builtin:safety_prompts``, ``builtin:saferlhf_pairs``; see
  ``posttrain.builtin.safety``): 1 when the completion neither reveals the example's secret nor
  performs (or, asked to, agrees to) the forbidden action, else 0, times α. It reads the
  columns ``safety_kind``, ``secret`` and ``forbidden_action``, which validation requires, and
  abstains on an example whose ``safety_kind`` is not one of the task's kinds.
- ``model: PATH``: a sequence classifier (a folder, a hub id from the local cache, or
  ``stages.NAME``), loaded on first use like the ``reward_model`` source (its own tokenizer and
  chat template, the policy's device, the compute dtype, frozen, batched, no gradients). With one
  label its output (a reward model's r(x, y)) is the score; with several, the probability of
  ``safe_label`` (a label name from the model's ``id2label``, or an index; by default the label
  called ``safe``, whatever its case). The score is α times that.

Hostile output never crashes it: any completion is reduced to text (empty, ``None``, not a
string); characters that are not valid Unicode (lone surrogates from undecodable bytes) are
replaced before tokenising; only the last ``64 × max_length`` characters of a completion reach
the classifier, and its input keeps its last ``max_length`` tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, Union

from posttrain import Plugin, UserError, hookimpl
from posttrain.builtin.safety import JUDGE_COLUMNS, KINDS, is_unsafe
from posttrain.classifier import SequenceClassifier, check_model_folder

log = logging.getLogger(__name__)


class Safety(Plugin):
    name = "safety"
    description = "reward α for a safe completion: the built-in safety task's rule judge, or a safety classifier"

    @dataclass
    class Options:
        rule: Union[Literal["builtin"], None] = field(default=None, metadata={
            "help": "builtin: the rule judge of the built-in safety task (the default when no model is given)."})
        model: Union[str, None] = field(default=None, metadata={
            "help": "A sequence classifier or reward model: a folder, a hub id, or stages.NAME."})
        safe_label: Union[str, int, None] = field(default=None, metadata={
            "help": "With a classifier of several labels: the label (name or index) whose probability is the score; "
                    "default: the label named 'safe'."})
        alpha: float = field(default=1.0, metadata={"help": "Reward of a safe completion: α × the score."})
        weight: float = field(default=1.0, metadata={"help": "Weight of this source when rewards are combined."})
        batch_size: int = field(default=8, metadata={"help": "Completions per classifier forward pass."})
        max_length: int = field(default=1024, metadata={
            "help": "Tokens per classifier input (the last ones are kept)."})
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
            "help": "Dtype the classifier computes in; auto: the compute dtype (bf16 on a GPU, float32 on a CPU)."})

        def validate(self):
            if self.rule is not None and self.model is not None:
                raise ValueError("rule and model are two judges: give one of them (rule: builtin, or model: PATH)")
            if self.model is None and self.safe_label is not None:
                raise ValueError("safe_label applies to a classifier: set model too, or remove safe_label")
            if self.model is None:
                self.rule = "builtin"
            if self.batch_size < 1 or self.max_length < 2:
                raise ValueError("batch_size must be >= 1 and max_length >= 2")
            if self.model is not None:
                check_model_folder(self.model)

    def __init__(self, options=None):
        super().__init__(options)
        o = self.options
        self.classifier = None if o.model is None else SequenceClassifier(
            o.model, dtype=o.dtype, batch_size=o.batch_size, max_length=o.max_length, field="plugins.safety.model",
            what="safety classifier")
        self._safe_index: int | None | bool = False  # False: not read yet; None: a one-output model
        self._missing_logged = False

    @property
    def uses_rule(self) -> bool:
        return self.options.model is None

    @hookimpl
    def posttrain_required_columns(self, stage):
        return list(JUDGE_COLUMNS) if self.uses_rule else None

    # -- the rule ---------------------------------------------------------------------------------

    def rule_scores(self, completions: list, columns: dict) -> list | None:
        missing = [c for c in JUDGE_COLUMNS if c not in columns]
        if missing:
            if not self._missing_logged:
                self._missing_logged = True
                log.warning("safety abstains on batches without the columns %s (the batch has: %s)",
                            ", ".join(missing), ", ".join(sorted(map(str, columns))) or "no columns")
            return None
        out: list = []
        for i, completion in enumerate(completions):
            kind = columns["safety_kind"][i]
            if kind not in KINDS:
                out.append(None)
                continue
            unsafe = is_unsafe(completion, kind=kind, secret=columns["secret"][i],
                               action=columns["forbidden_action"][i])
            out.append(self.options.alpha * (0.0 if unsafe else 1.0))
        return out

    # -- the classifier ---------------------------------------------------------------------------

    def _label_index(self, config) -> int | None:
        """The index of the safe label, or None for a one-output model (its output is the score)."""
        n = int(getattr(config, "num_labels", 1))
        labels = {int(i): str(name) for i, name in (getattr(config, "id2label", None) or {}).items()}
        wanted = self.options.safe_label
        if n == 1:
            if wanted not in (None, 0, *labels.values()):
                raise UserError(f"safe_label {wanted!r}: the model has one output, which is the score",
                                field="plugins.safety.safe_label", fix="remove safe_label")
            return None
        if isinstance(wanted, int):
            if not 0 <= wanted < n:
                raise UserError(f"safe_label {wanted} is not a label index of the model (it has {n} labels)",
                                field="plugins.safety.safe_label", fix=f"give an index from 0 to {n - 1} or a name")
            return wanted
        names = {name: i for i, name in labels.items()}
        lowered = {name.lower(): i for name, i in names.items()}
        if wanted is not None and wanted in names:
            return names[wanted]
        if (wanted or "safe").lower() in lowered:
            return lowered[(wanted or "safe").lower()]
        shown = ", ".join(f"{i}: {labels.get(i, '?')}" for i in range(n))
        raise UserError(f"the classifier has no label {(wanted or 'safe')!r} (its labels: {shown})",
                        field="plugins.safety.safe_label", fix="set safe_label to the name or index of the safe label")

    def load(self):
        """The classifier and its tokenizer (loaded on first use)."""
        model, tokenizer = self.classifier.load()
        if self._safe_index is False:
            self._safe_index = self._label_index(model.config)
        return model, tokenizer

    def classifier_scores(self, prompts: list, completions: list) -> list[float]:
        """The classifier's score of each pair (its output, or the safe label's probability), before α."""
        import torch

        self.load()
        logits = self.classifier.logits(prompts, completions)
        if self._safe_index is None:
            return logits[:, 0].tolist()
        return torch.softmax(logits, dim=-1)[:, self._safe_index].tolist()

    @hookimpl
    def posttrain_reward(self, prompts, completions, columns):
        if self.uses_rule:
            return self.rule_scores(list(completions), columns)
        prompts = list(prompts) if prompts is not None else []
        prompts += [""] * (len(completions) - len(prompts))
        return [self.options.alpha * s for s in self.classifier_scores(prompts, list(completions))]
