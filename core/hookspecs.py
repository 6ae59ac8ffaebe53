"""Every hook a posttrain plugin can implement.

This module is the contract between the core and plugins. Each hook below says

- **when** the core calls it,
- **what** it receives (an implementation may accept any subset of the arguments, by name,
  so a plugin written today keeps working when a hook gains an argument), and
- **how results combine** when several enabled plugins implement it:

  * *one owner*: at most one enabled plugin may implement it (the core refuses a recipe in
    which two do, before loading anything); the owner's return value is used;
  * *first result*: implementations are tried in order and the first non-``None`` wins;
  * *all results*: every implementation is called and the results are combined as stated
    (merged, concatenated, summed, chained).

Only plugins enabled by the recipe take part in a run. ``docs/hooks.md`` has a section for
each hook here (a test keeps the two in step).

The arguments and results carry their real types (``torch.Tensor``, ``datasets.Dataset``, the
:mod:`posttrain.types` classes), so an editor shows them; the heavy libraries are imported for type
checkers only, so ``posttrain validate`` and ``posttrain plugins`` stay fast.

Each hook's whole contract is declared on its spec, ``@spec(combine, returns, check, role)``: the
combine rule (which also sets pluggy's ``firstresult``), what a result other than ``None`` must be
(checked at every call, a plugin breaking it is named), and whether the hook is *supporting* (alone it
makes a plugin useful nowhere) or a data format's. :data:`CONTRACTS` holds them by hook name; a test
keeps each docstring's "Combine:" line equal to the declared rule.

Which hooks each stage calls is part of each stage's declaration (``Stage.hooks`` in
``posttrain.stages``); ``docs/hooks.md`` has the table, tested against them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from .types import Advantages, Critic, GroupFilter, PreferenceLoss, Transformed

if TYPE_CHECKING:  # pragma: no cover - for editors and type checkers; nothing heavy is imported at run time
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback

    from .types import PreferenceLogps, Rollouts

PROJECT = "posttrain"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

ONE_OWNER = "one owner"  # at most one enabled plugin implements it; its result is used
FIRST_RESULT = "first result"  # implementations are tried in order; the first non-None wins
ALL_RESULTS = "all results"  # every implementation is called; the results combine as the docstring says

# The roles a hook can have besides its combine rule:
SUPPORTING = "supporting"  # alone it makes a plugin useful in no stage (a plugin made only of such hooks is
# accepted in every stage; one with other hooks is refused in a stage that calls none of those)
FORMAT = "format"  # a data format's hook: the format is named by a recipe's `data.format` (or detected), not
# enabled under `plugins`, and no stage calls these hooks through the plugin set


@dataclass(frozen=True)
class Contract:
    """A hook's contract beside its spec: how results combine, what a result other than ``None`` must be
    (``check`` tests it, ``returns`` says it in words for the error naming a plugin that broke it), and
    its role. Shapes that depend on the batch are checked where the result is used."""

    combine: str
    returns: str
    check: Callable[[Any], bool]
    role: str | None = None


CONTRACTS: dict[str, Contract] = {}


def spec(combine: str, returns: str, check: Callable[[Any], bool], role: str | None = None):
    """Declare a hook: its pluggy spec (``firstresult`` unless every result is used) and its
    :class:`Contract`, in :data:`CONTRACTS` under the hook's name."""

    def declare(function):
        CONTRACTS[function.__name__] = Contract(combine, returns, check, role)
        return hookspec(firstresult=combine != ALL_RESULTS)(function)

    return declare


def _instance_of(value, module: str, *names: str) -> bool:
    """isinstance(value, module.name) for a heavy library's class, without importing the library: a value of
    that class can only exist once its module is imported."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(value, tuple(getattr(loaded, n) for n in names))


def _is_tensor(value) -> bool:
    return _instance_of(value, "torch", "Tensor")


def _is_scalar_tensor(value) -> bool:
    return _is_tensor(value) and value.numel() == 1


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_dataset(value) -> bool:
    return _instance_of(value, "datasets", "Dataset", "IterableDataset")


def _is_names(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(c, str) for c in value)


def _is_index_pair(value) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) for i in value) and value[0] != value[1])


# --------------------------------------------------------------------------------------
# Configuration family
# --------------------------------------------------------------------------------------


@spec(ALL_RESULTS, "a dict of TRL config field names to values",
      lambda r: isinstance(r, dict) and all(isinstance(k, str) for k in r), role=SUPPORTING)
def posttrain_trl_config(stage: str, recipe: dict[str, Any]) -> dict[str, Any] | None:
    """Contribute values to the TRL config of the run (e.g. ``DPOConfig``).

    Called once, while the recipe is validated (before any model is loaded); the merged result
    is what the trainer is built with (``DPOConfig`` in the preference stage, ``GRPOConfig`` in
    the online stage). ``recipe`` is the resolved recipe as plain data; do not modify it. Raise
    :class:`posttrain.UserError` (naming the field and the fix) for settings that cannot work.

    Return a mapping of TRL config field names to values, or ``None``.

    Combine: *all results*, merged. Two plugins that set the same field to different values
    are a recipe error naming both. A value the user also sets in the recipe's ``training``
    section must agree with it, or the recipe is refused with both values shown. Field names
    are checked against the TRL config class.
    """


@spec(ALL_RESULTS, "a list of transformers.TrainerCallback objects",
      lambda r: isinstance(r, (list, tuple)) and all(_instance_of(c, "transformers", "TrainerCallback") for c in r),
      role=SUPPORTING)
def posttrain_callbacks(stage: str, recipe: dict[str, Any]) -> list[TrainerCallback] | None:
    """Contribute ``transformers.TrainerCallback`` objects to the trainer.

    Called once when the trainer is built. Return a list of callbacks (instances) or ``None``.

    Combine: *all results*, concatenated in plugin order.
    """


@spec(ALL_RESULTS, "a dict of metric names to numbers",
      lambda r: isinstance(r, dict) and all(_is_number(v) or _is_scalar_tensor(v) for v in r.values()))
def posttrain_step_metrics(logps: PreferenceLogps, stage: str) -> dict[str, float] | None:
    """Contribute extra metrics computed from a training or evaluation batch.

    Called after the loss of every batch. ``logps`` is the
    :class:`posttrain.types.PreferenceLogps` of the batch. Return ``{name: float}`` or ``None``;
    values are averaged over the logging interval and written to ``metrics.jsonl``.

    Combine: *all results*, merged; two plugins reporting the same metric name is an error.
    """


# --------------------------------------------------------------------------------------
# Loss family
# --------------------------------------------------------------------------------------


@spec(ONE_OWNER, "a posttrain.PreferenceLoss (losses, chosen_rewards, rejected_rewards: one per pair)",
      lambda r: isinstance(r, PreferenceLoss))
def posttrain_preference_loss(logps: PreferenceLogps) -> PreferenceLoss:
    """Compute the preference loss of a batch of pairs.

    ``logps`` is a :class:`posttrain.types.PreferenceLogps`: per-sequence policy log-probs of
    the chosen and rejected responses (summed over response tokens), the reference's (or
    ``None`` when no plugin needs a reference), response token counts, and the per-token
    log-probs with their masks.

    Return a :class:`posttrain.types.PreferenceLoss` holding the per-pair loss (shape ``(B,)``;
    the trainer takes the mean) and the implicit rewards of the chosen and rejected responses
    (shape ``(B,)``, used for metrics and the held-out preference accuracy).

    Combine: *one owner*. A preference stage needs exactly one enabled plugin implementing
    this hook (``dpo`` is the default); two are a recipe error naming both.
    """


@spec(ALL_RESULTS, "a dict of term names to scalar tensors",
      lambda r: isinstance(r, dict) and all(_is_scalar_tensor(v) for v in r.values()))
def posttrain_loss_terms(logps: PreferenceLogps) -> dict[str, torch.Tensor] | None:
    """Add terms to the loss (e.g. an NLL term on the chosen response, a regulariser).

    Called after :func:`posttrain_preference_loss` on every batch, with the same ``logps``.
    Return ``{name: scalar tensor}`` or ``None``. Each term is added to the loss as is (apply
    your own weight) and logged as ``loss/<name>``.

    Combine: *all results*, summed into the loss; two plugins using the same term name is an
    error.
    """


@spec(ALL_RESULTS, "True, False or None", lambda r: isinstance(r, bool), role=SUPPORTING)
def posttrain_reference_needed(stage: str) -> bool | None:
    """Say whether this plugin needs reference-model log-probs.

    Called while the recipe is validated and again when the trainer is built. Return ``True``
    (needed), ``False`` (not needed by this plugin, e.g. a reference-free loss) or ``None`` (no
    opinion).

    Combine: *all results*. Preference stage: the reference is computed when any plugin
    returns ``True``, or when none returns ``False``; it is skipped only when some plugin
    returns ``False`` and none returns ``True``. When it is skipped, ``logps.ref_chosen_logps``
    and ``logps.ref_rejected_logps`` are ``None``. Online stage: the reference exists only with
    a KL penalty (``training.beta`` > 0); a plugin returning ``True`` there without one is a
    recipe error.
    """


@spec(ALL_RESULTS, "a list of column names", _is_names, role=SUPPORTING)
def posttrain_required_columns(stage: str) -> list[str] | None:
    """Name the dataset columns this plugin needs, beyond the stage's own.

    Called during validation, so data without them is refused before any model is loaded, with
    the plugin named. One column has a meaning to the preference stage: ``reference``, a gold
    response per example (TPO). When a plugin requires it, the core tokenises it like the other
    responses, runs the policy on it in the same forward pass, and fills ``logps.gold_*``.

    Combine: *all results*, united.
    """


@spec(ALL_RESULTS, "a sentence saying what is wrong with the record, or None",
      lambda r: isinstance(r, str), role=SUPPORTING)
def posttrain_check_record(record: dict[str, Any], row: int, stage: str) -> str | None:
    """Say what is wrong with one record of the data for this plugin, before anything loads.

    Called for every record (``record`` in the stage's columns, ``row`` its number from 1): during
    validation for local files, when the run loads them for built-in and hub data. Return
    a sentence saying what is wrong (e.g. "'ground_truth' is a mapping, not an answer"), or ``None``
    when the record is fine. A sentence refuses the data with exit status 2, naming the row, the
    plugin and its words.

    Combine: *all results*: the first sentence, in plugin order, refuses the row.
    """


# --------------------------------------------------------------------------------------
# Sampler family
# --------------------------------------------------------------------------------------


@spec(ONE_OWNER, "one list of completion strings per prompt",
      lambda r: isinstance(r, (list, tuple)) and all(isinstance(c, (list, tuple)) for c in r))
def posttrain_sample(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str | list[dict[str, Any]]],
    num_samples: int, generation: dict[str, Any]
) -> list[list[str]] | None:
    """Produce completions for prompts.

    Used wherever the core needs the policy's own outputs: the held-out greedy evaluation of
    both stages, and the rollouts of the online stage. ``prompts`` are strings or message lists
    (conversational); ``generation`` holds generation settings (``max_new_tokens``,
    ``do_sample``, ``temperature``, ``top_p``, ...). In the online stage ``model`` is the
    current policy unwrapped for generation, ``num_samples`` is 1 and each prompt already
    appears once per sample of its group.

    Return one list of ``num_samples`` completion strings per prompt, or ``None`` to leave the
    job to the default sampler: ``model.generate`` for evaluation, the TRL trainer's own
    generation (transformers or vLLM, as configured) for online rollouts. Online, returned
    strings are tokenised (no special tokens added), cut at ``max_completion_length`` tokens
    and end with the EOS token unless cut.

    Combine: *one owner* (at most one enabled plugin); without one the default sampler runs.
    """


# --------------------------------------------------------------------------------------
# Reward-source family
# --------------------------------------------------------------------------------------


@spec(ALL_RESULTS, "a list with one float (or None to abstain) per completion",
      lambda r: isinstance(r, (list, tuple)) and all(r_ is None or _is_number(r_) for r_ in r))
def posttrain_reward(
    prompts: list[Any], completions: list[Any], columns: dict[str, list[Any]],
    completion_ids: list[list[int]] | None, truncated: list[bool] | None
) -> list[float | None] | None:
    """Score completions.

    ``prompts[i]`` produced ``completions[i]``; ``columns`` maps every dataset column name to
    its values for the same examples (gold answers, constraint ids, labels...).
    ``completion_ids[i]`` are the token ids of ``completions[i]`` as generated, a list of ints: up
    to and including the EOS token that ended it, or up to the length limit
    (``max_completion_length`` online, ``max_new_tokens`` elsewhere) where it was cut there.
    ``truncated[i]`` is True for a completion cut at the length limit (its ids do not end with EOS),
    as TRL counts ``completions/clipped_ratio``. A sampler plugin's texts are tokenised (no special
    tokens added) and end with EOS unless they reach the limit. Both are ``None`` where completions
    come from outside a run (``posttrain.score``). Return one score per completion: a float, or
    ``None`` to abstain for that example. Return ``None`` instead of a list to abstain for the
    whole batch.

    Combine: *all results*, as a weighted sum per example: each source's scores are multiplied
    by its ``weight`` option (1.0 when the plugin has none) and summed over the sources that
    did not abstain. An example on which every source abstains has no reward (``None``); in
    the online stage its advantage is 0. Each source's scores are also reported separately,
    under its plugin name (online: ``rewards/<plugin>/mean`` in ``metrics.jsonl``).
    """


# --------------------------------------------------------------------------------------
# Advantage family (online stage)
# --------------------------------------------------------------------------------------


@spec(ONE_OWNER, "a tensor of advantages, or a posttrain.Advantages",
      lambda r: _is_tensor(r) or isinstance(r, Advantages))
def posttrain_advantage_estimate(rollouts: Rollouts) -> torch.Tensor | Advantages:
    """Turn the rewards of a batch of rollouts into advantages.

    Called once per generation batch of the online stage, after the reward sources have
    scored it. ``rollouts`` is a :class:`posttrain.types.Rollouts`: the combined reward of
    every completion of the batch gathered from all processes (``NaN`` where every source
    abstained), each source's rewards, the group size (completions per prompt; rows of a group
    are consecutive), this process's completion mask and the slice of the gathered rows that
    are this process's.

    Return either per-sequence advantages of shape ``(N,)`` for all gathered rows, or
    per-token advantages of shape ``(n, T)`` for this process's rows (``n`` rows of
    ``rollouts.completion_mask``; the form a value-model/GAE estimator produces). ``NaN``
    entries are allowed (unscorable rows); they become 0 after the transforms. An estimator that
    learns with a critic returns a :class:`posttrain.Advantages` instead: the advantages, the
    value targets the critic trains on (``(n, T)``), and whether it folded the KL penalty into the
    reward (TRL's in-loss KL term is then dropped). With a critic, ``rollouts`` also carries the
    per-token ``values``, ``logps`` (the policy's at sampling time), ``ref_logps`` (with
    ``training.beta`` > 0) and ``kl_coef`` (β).

    Combine: *one owner*. An online stage needs exactly one enabled plugin implementing this
    hook (``group_relative`` for GRPO's baseline, ``leave_one_out`` for RLOO's).
    """


@spec(ONE_OWNER, "a posttrain.Critic", lambda r: isinstance(r, Critic))
def posttrain_critic(stage: str) -> Critic | None:
    """Provide a learned critic (a value function) trained alongside the policy.

    Called once when the online trainer is built. Return a :class:`posttrain.Critic`: the core
    calls its ``setup(trainer)`` once, ``values(...)`` on every rollout batch (they reach the
    advantage estimator as ``rollouts.values``), ``train_on(...)`` on every training micro-batch
    with the value targets the estimator returned (``posttrain.Advantages.value_targets``),
    ``step()`` after every policy optimizer step, and ``save``/``load`` with every checkpoint.
    With a critic, ``num_generations`` may be 1 (the critic is the baseline).

    Combine: *one owner*.
    """


@spec(ALL_RESULTS, "a tensor of advantages", _is_tensor)
def posttrain_advantage_transform(advantages: torch.Tensor, rollouts: Rollouts) -> torch.Tensor | None:
    """Transform advantages before they reach the loss (normalise, clip, reshape...).

    Called after :func:`posttrain_advantage_estimate` with its result (or the previous
    transform's) in ``advantages`` (shape ``(N,)`` or ``(n, T)`` as described there) and the
    same ``rollouts``. Statistics over the whole batch must use the gathered rows, or
    ``rollouts.gather`` for per-token values, so that every process computes the same numbers.

    Return the new advantages (same shape) or ``None`` to leave them unchanged.

    Combine: *all results*, chained in plugin order; each implementation receives the previous
    one's output. ``NaN`` entries (unscorable rows) are set to 0 after the last transform.
    """


@spec(ALL_RESULTS, "a posttrain.GroupFilter (keep: one bool per group of the gathered batch; max_rounds)",
      lambda r: isinstance(r, GroupFilter))
def posttrain_filter_groups(rollouts: Rollouts) -> GroupFilter | None:
    """Choose which groups of a sampled batch train, and let the stage sample more to replace the rest.

    Called once per sampling round of a generation batch of the online stage (training only), after the
    reward sources have scored it and before any advantage is computed. ``rollouts`` is the round's
    batch, as :func:`posttrain_advantage_estimate` receives it (the rewards gathered from every process,
    in groups of ``group_size`` consecutive rows). Return a :class:`posttrain.GroupFilter`: ``keep``,
    one bool per group of the gathered batch (``N / group_size`` of them), and ``max_rounds``, how many
    extra sampling rounds the stage may run per batch to replace the groups dropped. Return ``None`` to
    keep every group.

    The stage keeps the groups every plugin keeps, samples a new batch of prompts (drawn from the
    training set, as many as the batch holds) while some process has fewer kept groups than its share
    of the batch and fewer extra rounds than the smallest ``max_rounds`` have run, and trains on the
    kept groups in the order they were sampled; a batch still short after the last round is filled up
    with dropped groups, so every update has the configured batch size. The advantage hooks then see
    the assembled batch. Each process holds whole groups (the stage refuses a batch per process that
    is not a multiple of ``num_generations``). Logged per step: ``filter_groups/kept``, ``/dropped``,
    ``/filled_with_dropped`` (groups), ``/rounds`` and ``/extra_completions``.

    Combine: *all results*: a group trains when every implementation keeps it; the stage runs at most the
    smallest ``max_rounds`` extra rounds.
    """


@spec(ONE_OWNER, "a pair (chosen_index, rejected_index) of two different indices, or None", _is_index_pair)
def posttrain_select_pair(prompt: str | list[dict[str, Any]], completions: list[str], rewards: list[float]
                          ) -> tuple[int, int] | None:
    """Choose the preference pair of one prompt from its scored samples (iterative stage).

    Called once per prompt of a round, after the reward sources scored its samples.
    ``completions`` are the samples that were scored (abstained ones are left out) and
    ``rewards`` their rewards (floats, same order); there are at least two. Return
    ``(chosen_index, rejected_index)`` into those lists, or ``None`` to drop the prompt this round
    (a tie, a reward gap below a threshold...). The core drops prompts whose samples all abstained
    or where fewer than two were scored before calling, and counts every kind of drop.

    Combine: *one owner*; without one, the best sample against the worst (``best_vs_worst`` with
    its defaults), ties dropped.
    """


# --------------------------------------------------------------------------------------
# Reference-update family
# --------------------------------------------------------------------------------------


@spec(ALL_RESULTS, "nothing (the result is ignored)", lambda r: True)
def posttrain_update_reference(trainer: Trainer, event: str, step: int) -> None:
    """Update the reference model.

    Called with ``event="step"`` after every optimizer step (``step`` is the global step) and,
    in an iterative stage, with ``event="round"`` at the end of each round (``step`` is the round,
    1, 2, ...), after its training and before the next round samples. ``trainer``
    is the running TRL trainer (the ``DPOTrainer`` or ``GRPOTrainer`` subclass):
    ``trainer.model`` is the policy, ``trainer.ref_model`` the reference (``None`` with LoRA,
    where the reference is the policy with its adapter disabled, or its ``ref`` adapter when
    one exists).

    Without any implementation the reference stays frozen.

    Combine: *all results*; every implementation is called, in plugin order. Return values are
    ignored.
    """


# --------------------------------------------------------------------------------------
# Data-format family
# --------------------------------------------------------------------------------------


@spec(FIRST_RESULT, "True, False or None", lambda r: isinstance(r, bool), role=FORMAT)
def posttrain_format_detect(columns: list[str], record: dict[str, Any]) -> bool | None:
    """Say whether a source whose first record is ``record`` is in this plugin's data format.

    Called while a recipe is validated and its data loaded, for every installed format plugin, when the
    recipe names no ``data.format``: the first plugin that answers True reads the source (posttrain says
    which). Answer only for a layout you recognise without doubt (a ShareGPT ``conversations`` column of
    ``from``/``value`` turns); a format whose reading needs a choice (PKU-SafeRLHF: safer or better) should
    be named by the recipe instead.

    Combine: *first result*, over the installed format plugins.
    """


@spec(ONE_OWNER, "a list of column names", _is_names, role=FORMAT)
def posttrain_format_columns(columns: list[str]) -> list[str] | None:
    """The columns a source will have once read in this format, from the columns it has.

    Called while the recipe is validated, before any record is read in full; raise
    :class:`posttrain.UserError` naming a column the layout needs and the source lacks.

    Combine: *one owner* (the format the recipe names, or the one detected).
    """


@spec(ONE_OWNER, "the record as a dict of columns", lambda r: isinstance(r, dict), role=FORMAT)
def posttrain_format_record(record: dict[str, Any], row: int) -> dict[str, Any]:
    """Read one record in this format: return it in the stage's columns (``prompt``/``chosen``/
    ``rejected``, ``messages``, ...), with whatever other columns the format keeps.

    Called for every record of the source (``row`` counts from 1), when validating (a streaming pass over
    local files) and when loading. Raise :class:`posttrain.UserError` naming the row for a record that does
    not fit the format. The record returned replaces the source's: columns it leaves out are dropped.

    Combine: *one owner*.
    """


# --------------------------------------------------------------------------------------
# Batching family
# --------------------------------------------------------------------------------------


@spec(ALL_RESULTS, "a datasets.Dataset, or a posttrain.Transformed(dataset, reason)",
      lambda r: _is_dataset(r) or (isinstance(r, Transformed) and _is_dataset(r.dataset)), role=SUPPORTING)
def posttrain_transform_dataset(dataset: Dataset, split: str, stage: str) -> Dataset | Transformed | None:
    """Filter or transform a dataset before training.

    Called once per split (``"train"``, ``"eval"``) after the recipe's column mapping and
    before tokenisation. ``dataset`` is a ``datasets.Dataset`` with the stage's columns
    (``prompt``, ``chosen``, ``rejected`` for preference data; ``prompt`` online) plus any others
    of the source.
    Return a new dataset, or ``None`` to leave it unchanged.

    Combine: *all results*, chained: each implementation receives the previous one's output,
    in plugin order. A split that ends up empty is an error naming the last plugin that
    changed it.
    """


@spec(ALL_RESULTS, "a 0/1 or boolean tensor shaped like the completion mask", _is_tensor)
def posttrain_token_mask(input_ids: torch.Tensor, completion_mask: torch.Tensor, tokenizer: PreTrainedTokenizerBase
                         ) -> torch.Tensor | None:
    """Remove tokens from the loss.

    Called on every batch before the forward passes. Preference stage: ``input_ids`` and
    ``completion_mask`` have shape ``(2B, T)``, chosen sequences first, then rejected (as TRL's
    preference collator builds them). sft stage: shape ``(B, T)``, one row per sequence, the mask
    1 on the completion tokens (applied by the collator). Return a boolean or 0/1 tensor of the
    same shape that is 1 where a token may stay in the loss, or ``None``.

    Combine: *all results*, multiplied into the completion mask (a token stays only when every
    plugin keeps it). Preference: policy and reference log-probs and the response lengths all
    use the combined mask. sft: a dropped token's label becomes -100 (the loss averages over the
    tokens kept).
    """


@spec(ONE_OWNER, "a collator (a callable that turns examples into a batch)", callable)
def posttrain_data_collator(tokenizer: PreTrainedTokenizerBase, default: Callable, stage: str) -> Callable | None:
    """Replace the collator that turns tokenised examples into batches.

    ``default`` is the collator TRL would use; wrap it or return another. Return ``None`` to
    keep the default.

    Combine: *one owner*.
    """


@spec(ONE_OWNER, "a torch.utils.data.Sampler",
      lambda r: _instance_of(r, "torch.utils.data", "Sampler") or hasattr(r, "__iter__"))
def posttrain_train_sampler(dataset: Dataset, batch_size: int, seed: int, stage: str
                            ) -> torch.utils.data.Sampler | None:
    """Choose the order in which training examples are drawn.

    ``dataset`` is the tokenised training dataset. Return a ``torch.utils.data.Sampler`` (for
    example one that groups pairs of similar length), or ``None`` for the trainer's default
    (random order).

    Combine: *one owner*.
    """


# The rules derived from the contracts above, for the registry's checks.
SINGLE_OWNER_HOOKS = tuple(n for n, c in CONTRACTS.items() if c.combine == ONE_OWNER and c.role != FORMAT)
SUPPORTING_HOOKS = tuple(n for n, c in CONTRACTS.items() if c.role == SUPPORTING)
FORMAT_HOOKS = tuple(n for n, c in CONTRACTS.items() if c.role == FORMAT)
