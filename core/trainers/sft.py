"""The sft stage: prompt/completion pairs (or conversations) in, a model fine-tuned on the completions
out, on ``SFTStageTrainer``, TRL's own SFTTrainer.

What is TRL's: tokenisation and chat templates, the completion-only loss (the prompt's tokens are
not trained on), packing and padding-free batching (``training.packing``, ``training.padding_free``),
the fused LM head, checkpointing and logging. What is ours, through small overrides:

- data: a ``messages`` conversation is trained on every assistant turn (``assistant_turns: every``, the
  default; Tülu 3's SFT and TRL's assistant-only loss): the conversation is tokenised with the chat
  template and each assistant reply's tokens (its end-of-turn token included) are the ones trained on,
  found by rendering the conversation up to that reply, so any template works, with or without
  ``{% generation %}`` markers. Conversations with one assistant turn, and ``assistant_turns: last``,
  go to TRL as a prompt (every turn before the last) and a completion (the last), TRL's own
  prompt-completion tokenisation. With ``training.assistant_only_loss: true`` the conversation goes
  to TRL whole (its template must mark the assistant turns). A ``text`` column is TRL's
  language-modelling format: every token is trained on;
- token masks: ``posttrain_token_mask`` plugins remove tokens from the loss; they are applied by the
  collator, so the loss is normalised by the tokens that are really trained on;
- held-out numbers: the completion NLL (TRL's evaluation loss, a mean over completion tokens), its
  perplexity and the next-token accuracy, before and after; greedy answers scored by the reward
  plugins when one is enabled (``trainers.evaluation.answer_metrics``).

"SFT on the chosen responses of a preference dataset" is a data mapping, ``columns: {completion:
chosen}``: the preference data's rejected column is left unused.
"""

from __future__ import annotations

import math
from pathlib import Path

from trl import SFTConfig, SFTTrainer

from ..errors import UserError
from ..errors import contract_error
from ..plugin_set import PluginSet
from ..validate import Plan
from .guard import GuardedTrainer
from .parts import finish_trainer, trainer_parts

STAGE = "sft"


def conversation_to_completion(example: dict) -> dict:
    """A ``messages`` conversation as a prompt (the turns before the last) and a completion (the last)."""
    messages = example["messages"]
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message of every conversation must be the assistant's reply")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


class TokenMaskCollator:
    """TRL's collator, then the ``posttrain_token_mask`` plugins: a token a plugin drops gets label -100."""

    def __init__(self, collator, plugins: PluginSet, tokenizer):
        self.collator, self.plugins, self.tokenizer = collator, plugins, tokenizer

    def __call__(self, examples):
        batch = self.collator(examples)
        labels = batch["labels"]
        completion = (labels != -100).long()
        for name, keep in self.plugins.call_each("posttrain_token_mask", input_ids=batch["input_ids"],
                                                 completion_mask=completion, tokenizer=self.tokenizer):
            if keep is None:
                continue
            if tuple(keep.shape) != tuple(labels.shape):
                raise contract_error(name, "posttrain_token_mask", keep,
                                     f"a mask of shape {tuple(labels.shape)}, one row per sequence")
            labels = labels.masked_fill(keep.to(labels.device) == 0, -100)
        batch["labels"] = labels
        return batch


class SFTStageTrainer(GuardedTrainer, SFTTrainer):
    """``trl.SFTTrainer`` whose token masks come from the enabled plugins, which counts the examples it cuts
    at max_length (and which stops at the first non-finite step, like every posttrain trainer)."""

    def __init__(self, *args, plugins: PluginSet, stage: str = STAGE, **kwargs):
        self.plugins = plugins
        self.stage = stage
        self.length_counts: dict[str, dict] = {}  # split -> {"kept", "cut", "how"}: see _prepare_dataset
        super().__init__(*args, **kwargs)
        if plugins.implementers("posttrain_token_mask"):
            self.data_collator = TokenMaskCollator(self.data_collator, plugins, self.processing_class)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL's preparation, in two calls: the first tokenises and builds the labels without truncating (max_length
        None, no packing, no shuffle), so the examples longer than max_length are counted from their tokens; the
        second truncates (or packs) and shuffles the tokenised dataset as one call would (TRL skips tokenising a
        dataset that has ``input_ids`` and building labels for one that has ``labels``).

        Without packing TRL drops the examples truncation leaves with no trained token. With packing
        (``packing_strategy: bfd``, TRL's default, which cuts each example at max_length) those examples are dropped
        here before packing, the same way, instead of being packed as sequences with nothing to train on (a loss of
        0). ``bfd_split`` and ``wrapped`` cut nothing: an example's overflow goes on in another packed sequence."""
        from datasets import Dataset

        max_length = args.max_length
        if max_length is None or not isinstance(dataset, Dataset) or dataset_name in self.length_counts:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        saved = args.max_length, args.shuffle_dataset
        args.max_length, args.shuffle_dataset = None, False
        try:
            tokenised = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
        finally:
            args.max_length, args.shuffle_dataset = saved
        strategy = args.packing_strategy if packing else None
        keep_end = not packing and args.truncation_mode == "keep_end"
        splits = strategy in ("bfd_split", "wrapped")  # an example's overflow goes on in another sequence
        keep, cut = [], 0
        for i, labels in enumerate(tokenised["labels"]):
            window = labels[-max_length:] if keep_end else labels[:max_length]
            if splits or any(label != -100 for label in window):
                keep.append(i)
                cut += not splits and len(labels) > max_length
        if strategy == "bfd" and len(keep) < len(tokenised):
            tokenised = tokenised.select(keep)
        how = f"packing_strategy {strategy}" if packing else f"truncation_mode {args.truncation_mode}"
        self.length_counts[dataset_name] = {"kept": len(keep), "cut": cut, "how": how}
        if not keep:  # nothing to pack (TRL's packing fails on no rows); the run stops on it (count_tokenisation_drops)
            return tokenised.select([])
        return super()._prepare_dataset(tokenised, processing_class, args, packing, formatting_func, dataset_name)


def heldout_metrics(plan: Plan, trainer, heldout) -> dict:
    """TRL's evaluation of the held-out completions: NLL per completion token, perplexity, token accuracy."""
    raw = trainer.evaluate()
    out = {}
    if "eval_loss" in raw:
        out["completion_nll"] = raw["eval_loss"]
        out["perplexity"] = math.exp(min(raw["eval_loss"], 50.0))
    if "eval_mean_token_accuracy" in raw:
        out["token_accuracy"] = raw["eval_mean_token_accuracy"]
    return out


def summary_extras(trainer) -> dict:
    return {}


def _chat_ids(tokenizer, messages, tools=None, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, **kwargs)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _shared(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def assistant_turn_tokens(messages: list[dict], tokenizer, tools=None, row: int | None = None) -> dict:
    """A conversation's tokens and a mask of 1 on every assistant reply (its end-of-turn token included): the
    tokens from where the template's rendering up to the reply's generation prompt ends to where its rendering
    up to the reply ends, as TRL finds a completion's tokens."""
    ids = _chat_ids(tokenizer, messages, tools)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _chat_ids(tokenizer, messages[:i], tools, add_generation_prompt=True)
        upto = _chat_ids(tokenizer, messages[:i + 1], tools)
        start, end = _shared(before, ids), _shared(upto, ids)
        if start < len(before) or end <= start:
            where = f"row {row}: " if row is not None else ""
            raise UserError(f"{where}the chat template renders conversation {'prefixes' if end > start else 'turns'} "
                            f"differently from the whole conversation (assistant turn {i}), so its tokens cannot be "
                            "told apart", field="assistant_turns",
                            fix="use assistant_turns: last (the last reply only, as TRL's prompt-completion data), or a "
                                "chat template that renders a conversation's start the same way alone")
        mask[start:end] = [1] * (end - start)
    return {"input_ids": ids, "assistant_masks": mask}


def _assistant_turns(dataset) -> int:
    """The most assistant turns a conversation of the dataset has."""
    return max((sum(m.get("role") == "assistant" for m in messages) for messages in dataset["messages"]), default=0)


def prepare(plan: Plan, dataset, tokenizer):
    """A split as the sft stage gives it to TRL (see the module's docstring)."""
    if dataset is None or "messages" not in dataset.column_names or "completion" in dataset.column_names:
        return dataset
    if plan.trl_config.get("assistant_only_loss"):
        return dataset  # TRL trains on every assistant turn of the whole conversation
    if plan.options.assistant_turns == "every" and _assistant_turns(dataset) > 1:
        keep = [c for c in dataset.column_names if c not in ("messages", "tools")]
        return dataset.map(lambda example, i: assistant_turn_tokens(example["messages"], tokenizer,
                                                                     example.get("tools"), row=i + 1),
                           with_indices=True, remove_columns=["messages", *keep],
                           desc="Tokenising every assistant turn")
    return dataset.map(conversation_to_completion, remove_columns=["messages"], desc="Splitting conversations")


def check_assistant_only_loss(plan: Plan, tokenizer) -> None:
    """TRL's assistant_only_loss on a template without generation markers that TRL cannot patch: exit 2, not
    TRL's error (validation refuses it when it can read the template)."""
    if not plan.trl_config.get("assistant_only_loss"):
        return
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return
    try:
        get_training_chat_template(tokenizer)
    except Exception as e:  # noqa: BLE001 - TRL knows no training version of this template
        raise UserError(f"TRL's assistant_only_loss needs {{% generation %}} markers in the chat template; this "
                        f"model's has none and TRL has no training version of it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})", field="training.assistant_only_loss",
                        fix="remove it: the sft stage already trains every assistant turn (assistant_turns: every), "
                            "for any chat template") from None


def build_trainer(plan: Plan, run_dir: Path):
    p = trainer_parts(plan, run_dir, SFTConfig)
    check_assistant_only_loss(plan, p.tokenizer)
    train, heldout = prepare(plan, p.train, p.tokenizer), prepare(plan, p.heldout, p.tokenizer)
    trainer = SFTStageTrainer(model=p.model, args=p.config, train_dataset=train, eval_dataset=heldout,
                              processing_class=p.tokenizer, peft_config=p.peft_config, callbacks=p.callbacks,
                              plugins=plan.plugins)
    answers = p.heldout
    if answers is not None and "messages" in answers.column_names:
        answers = answers.map(conversation_to_completion, remove_columns=["messages"])
    return finish_trainer(trainer, p.precision), answers


DROPPED = ("examples with no completion token left after truncation to training.max_length = {max_length} tokens "
           "(TRL's SFTTrainer drops them; with packing, posttrain does before packing)")


def rows_kept(trainer, split: str) -> int | None:
    """The examples of a split left after truncation (with packing, the prepared rows are packed sequences)."""
    return getattr(trainer, "length_counts", {}).get(split, {}).get("kept")


def rows_cut(trainer, split: str, dataset) -> tuple[int, int, str] | None:
    """The examples cut at max_length (counted by ``SFTStageTrainer._prepare_dataset``), of those kept."""
    counts = getattr(trainer, "length_counts", {}).get(split)
    return None if counts is None else (counts["cut"], counts["kept"], counts["how"])
