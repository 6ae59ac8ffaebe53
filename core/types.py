"""Data passed between the core and plugins' hooks. Tensors are ``torch.Tensor``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PreferenceLogps:
    """Log-probabilities of a batch of B preference pairs.

    Sequence log-probs are sums of token log-probs over the response tokens that survive the
    token masks; lengths count those tokens.
    """

    chosen_logps: Any  # (B,) policy, requires grad while training
    rejected_logps: Any  # (B,)
    ref_chosen_logps: Any | None  # (B,) or None when no plugin needs a reference
    ref_rejected_logps: Any | None  # (B,)
    chosen_lengths: Any  # (B,) response token counts
    rejected_lengths: Any  # (B,)
    chosen_token_logps: Any  # (B, T) per-token policy log-probs, 0 outside the mask
    rejected_token_logps: Any  # (B, T)
    chosen_mask: Any  # (B, T) 1 where a response token is in the loss
    rejected_mask: Any  # (B, T)
    training: bool = True
    # The reference's per-token log-probs (B, T), 0 outside the masks: present when the reference runs with
    # the batch (None without a reference, and with precompute_ref_log_probs, which keeps only the sums).
    # They sum to ref_chosen_logps / ref_rejected_logps. Token-level losses (TDPO, LD-DPO) read them.
    ref_chosen_token_logps: Any | None = None
    ref_rejected_token_logps: Any | None = None
    # The gold ("reference" column) response, when a plugin requires that column; else None.
    gold_logps: Any | None = None  # (B,)
    gold_lengths: Any | None = None  # (B,)
    gold_token_logps: Any | None = None  # (B, T)
    gold_mask: Any | None = None  # (B, T)

    @property
    def chosen_logratios(self):
        """log π(y_w|x) − log π_ref(y_w|x)."""
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self):
        """log π(y_l|x) − log π_ref(y_l|x)."""
        return self.rejected_logps - self.ref_rejected_logps


@dataclass
class PreferenceLoss:
    """What the owner of ``posttrain_preference_loss`` returns."""

    losses: Any  # (B,) per-pair loss; the trainer averages it
    chosen_rewards: Any  # (B,) implicit reward of the chosen response (detached is fine)
    rejected_rewards: Any  # (B,)


@dataclass
class Rollouts:
    """A scored generation batch of the online stage, as the advantage hooks see it.

    Rows are completions. ``rewards`` and ``rewards_by_source`` hold every row of the batch,
    gathered from all processes, in groups of ``group_size`` consecutive rows that share a
    prompt; ``local`` selects this process's rows, which ``completion_mask`` (and the local
    ``prompts``/``completions``) describe.
    """

    rewards: Any  # (N,) weighted sum of the sources; NaN where every source abstained
    rewards_by_source: dict  # plugin name -> (N,) its unweighted rewards, NaN where it abstained
    group_size: int  # completions per prompt
    completion_mask: Any  # (n, T) this process's completion tokens
    local: slice  # this process's rows within the N gathered rows
    prompts: list  # this process's prompts (n)
    completions: list  # this process's completions (n)
    training: bool = True
    gather: Any = None  # gather(tensor) -> the tensor concatenated over processes (dim 0)
    # Per-token, for this process's rows (n, T), 0 on padding:
    logps: Any = None  # the policy's log-probs of the sampled tokens, at sampling time
    ref_logps: Any = None  # the reference's (None without a reference: training.beta = 0)
    values: Any = None  # the critic's V(x, y_<t) (None without a `critic` plugin)
    kl_coef: float = 0.0  # β (training.beta): the KL penalty's weight

    @property
    def grouped_rewards(self):
        """``rewards`` as (number of prompts, group_size)."""
        return self.rewards.view(-1, self.group_size)


@dataclass
class GroupFilter:
    """What a ``posttrain_filter_groups`` implementation returns: which groups of a sampled batch train
    (``keep``, one bool per group of the gathered batch, in order) and at most how many extra sampling
    rounds the stage may run per batch to replace the dropped ones."""

    keep: list  # one bool per group of the gathered batch
    max_rounds: int = 0


@dataclass
class Transformed:
    """What a ``posttrain_transform_dataset`` implementation may return instead of a bare dataset: the
    dataset and why rows were dropped (e.g. "both responses unsafe"). posttrain counts the rows every
    transform keeps and drops either way; the reason is printed beside the counts and recorded in
    ``summary.json`` (``data_transforms``)."""

    dataset: Any  # a datasets.Dataset
    reason: str = ""


@dataclass
class Advantages:
    """What an advantage estimator may return instead of a bare tensor (the form a critic-based
    estimator such as ``gae`` returns)."""

    advantages: Any  # (N,) per completion of the gathered batch, or (n, T) per token of this process's rows
    value_targets: Any = None  # (n, T) what the critic learns (returns); NaN rows are left out
    kl_in_reward: bool = False  # the estimator folded β·KL into the reward: TRL's in-loss KL term is dropped


class Critic:
    """A learned value function V(x, y_<t), trained alongside the policy in the online stage.

    The owner of ``posttrain_critic`` returns one. The core calls :meth:`setup` once the trainer is
    built, :meth:`values` on every rollout batch (the advantage estimator reads them from
    ``rollouts.values``), :meth:`train_on` on every training micro-batch with the estimator's value
    targets (it computes the value loss and back-propagates it), :meth:`step` after every policy
    optimizer step, and :meth:`save` / :meth:`load` with every checkpoint.
    """

    def setup(self, trainer) -> None:
        """Called once with the built ``OnlineTrainer`` (its model, accelerator and args)."""

    def values(self, input_ids, attention_mask, logits_to_keep: int):
        """(n, logits_to_keep) values of the states before each of the last ``logits_to_keep`` tokens."""
        raise NotImplementedError

    def train_on(self, input_ids, attention_mask, logits_to_keep: int, targets, old_values, mask,
                 scale: float) -> dict:
        """Value loss on one micro-batch, differentiated with ``scale`` (1 / accumulation steps) and its
        gradients accumulated for :meth:`step`; returns metrics (``value_loss`` at least). The gradients
        must stay the critic's own: a parameter's ``.grad`` that the policy's model holds would be clipped
        and stepped with the policy's (the built-in critic uses ``torch.autograd.grad`` into its own buffers)."""
        raise NotImplementedError

    def step(self) -> None:
        """One optimizer step of the critic (after the policy's)."""
        raise NotImplementedError

    def engine_facts(self) -> dict | None:
        """For the stage's summary (``critic_engine``): what an engine of the critic's own holds on this
        process (its ZeRO stage, its parameters and how many are sharded); None without one."""
        return None

    def save(self, folder) -> None:
        """Write the critic's state (weights and optimizer) into the checkpoint ``folder``. Called on every
        process: a critic sharded over the processes writes its shard; a whole one writes from the main
        process only (``trainer.is_world_process_zero()``)."""
        raise NotImplementedError

    def load(self, folder) -> None:
        raise NotImplementedError


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of the last message of a message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return "" if completion is None else str(completion)
