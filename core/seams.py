"""Every private name of TRL, transformers and pluggy that posttrain relies on, reached through here.

posttrain subclasses TRL's trainers and overrides a few of their methods; it also uses a handful of
TRL's and pluggy's private helpers. A library release may rename or move any of them without notice.
Listing them in one place lets a test (tests/test_seams.py) check each one against the installed
versions, and fail with a message that names what moved, instead of a TRL upgrade breaking a run in a
way nobody can list. docs/architecture.md lists them with the supported versions.

No heavy import at module level: the accessors import when they are called.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

# The methods posttrain's trainers override or call on TRL's and transformers' classes (their names and
# what they do must stay as in the supported versions).
OVERRIDDEN = {
    "transformers.Trainer": (
        "_get_grad_norm",  # GuardedTrainer: the non-finite check sits between the gradient norm and the step
        "training_step",  # GuardedTrainer: the step's summed loss
        "_save_checkpoint",  # OnlineTrainer: the critic's state saved with every checkpoint
        "_load_optimizer_and_scheduler",  # OnlineTrainer: the critic's state restored on --resume
        "_get_train_sampler",  # PreferenceTrainer: posttrain_train_sampler
        "_run_epoch",  # GuardedTrainer: not started when a resumed run has no step left (no extra step)
        "init_hf_repo",  # GuardedTrainer: a hub repository that cannot be created does not stop training
        "_push_from_checkpoint",  # GuardedTrainer: a checkpoint's failed upload is said, training goes on
        "push_to_hub",  # GuardedTrainer: the final upload's failure recorded (hub_upload), the model kept
        "evaluate",  # OnlineTrainer: evaluation during training is the greedy held-out answers, scored
    ),
    "trl.DPOTrainer": (
        "_compute_loss",  # PreferenceTrainer: the loss, masks, metrics from hooks (TRL computes every loss here)
        "_prepare_dataset",  # PreferenceTrainer: gold responses tokenised (TPO)
        "_set_signature_columns_if_needed",  # PreferenceTrainer: keeps the gold responses' column
        "compute_ref_log_probs",  # the reference's log-probs (adapter disabled with LoRA)
        "create_model_card",  # the model card names the plugins
    ),
    "trl.SFTTrainer": (
        "_prepare_dataset",  # SFTStageTrainer: tokenised untruncated first, the examples cut at max_length counted
    ),
    "trl.GRPOTrainer": (
        "_calculate_rewards",  # OnlineTrainer: the gathered rewards the advantage hooks read
        "_generate_and_score_completions",  # OnlineTrainer: advantages replaced by the hooks' (no narrower place)
        "_get_per_token_logps_and_entropies",  # OnlineTrainer: the policy's log-probs for the critic's GAE
        "_generate",  # OnlineTrainer: the prompts a sampler plugin is given
        "_generate_single_turn",  # OnlineTrainer: generation under autocast, or by a sampler plugin
        "_compute_loss",  # OnlineTrainer: the KL term dropped when it is in the reward; the critic's loss
    ),
}

# Attributes of a built trainer that posttrain reads or writes (checked on real trainers by the tests).
INSTANCE_ATTRIBUTES = {
    "trl.DPOTrainer": ("_metrics", "_tokenizer", "_total_train_tokens", "_tp_size", "aux_loss_enabled",
                       "precompute_ref_logps", "_name", "_paper"),
    "trl.GRPOTrainer": ("_metrics", "_logs", "_tokenizer", "reward_weights", "reward_func_names", "num_generations",
                        "num_generations_eval", "max_completion_length", "beta", "_name", "_paper"),
}

# Module-level names: (module, attribute, what posttrain does with it).
MODULE_NAMES = (
    ("pluggy._hooks", "varnames", "the argument names of a hook implementation, checked against its spec"),
    ("trl.data_utils", "_tokenize", "tokenising a conversation or text exactly as TRL does for its trainers"),
    ("trl.trainer.dpo_trainer", "create_model_from_path", "how DPOTrainer builds a frozen reference copy"),
    ("trl.trainer.grpo_trainer", "create_model_from_path", "how GRPOTrainer builds a frozen reference copy"),
    ("trl.trainer.distillation_trainer", "create_model_from_path", "how DistillationTrainer builds its teacher"),
    ("trl.trainer.grpo_trainer", "logger", "GRPOTrainer's logger (a warning for abstaining rewards is filtered)"),
    ("trl.trainer.reward_trainer", "suppress_seqcls_warning", "silence 'score.weight newly initialised' for a new head"),
    ("trl.experimental.tpo.tpo_trainer", "DataCollatorForTriplePreference", "batches of [chosen; rejected; gold]"),
    ("trl.models", "unwrap_model_for_generation", "the policy gathered for a sampler plugin (ZeRO-3)"),
    ("trl.trainer.callbacks", "SyncRefModelCallback", "moving a frozen reference copy (ZeRO-3 gathered)"),
    ("transformers.integrations.deepspeed", "_hf_deepspeed_config_weak_ref",
     "the process-wide ZeRO-3 setting under which from_pretrained builds a model sharded"),
)


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def problems() -> list[str]:
    """Every seam that does not resolve in the installed versions, in words (empty: all there)."""
    out = []
    for owner, methods in OVERRIDDEN.items():
        try:
            cls = _resolve(owner)
        except (ImportError, AttributeError) as e:
            out.append(f"{owner} is gone ({type(e).__name__}: {e})")
            continue
        for method in methods:
            if not callable(getattr(cls, method, None)):
                out.append(f"{owner}.{method} is gone: posttrain overrides or calls it")
    for module, name, use in MODULE_NAMES:
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            out.append(f"{module}.{name} is gone ({type(e).__name__}): posttrain uses it for {use}")
    return out


def missing_attributes(trainer) -> list[str]:
    """The instance attributes of ``INSTANCE_ATTRIBUTES`` a built trainer lacks."""
    out = []
    for owner, names in INSTANCE_ATTRIBUTES.items():
        if isinstance(trainer, _resolve(owner)):
            out += [f"{owner} instance has no {name}" for name in names if not hasattr(trainer, name)]
    return out


def varnames(function) -> tuple:
    """(positional argument names, keyword-only names) of a hook function, as pluggy reads them."""
    from pluggy._hooks import varnames as pluggy_varnames

    return pluggy_varnames(function)


def tokenize(tokenizer, text_or_messages, **kwargs) -> dict:
    """TRL's own tokenisation of text (special tokens added) or of a conversation (the chat template)."""
    from trl.data_utils import _tokenize

    return _tokenize(tokenizer, text_or_messages, **kwargs)


@contextlib.contextmanager
def reference_builder(trainer_module: str, reference):
    """While a TRL trainer is built, let ``reference`` answer the one call TRL makes to build a frozen
    reference copy of the policy (``create_model_from_path`` in ``trl.trainer.<trainer_module>``; TRL has no
    other way in): a callable returning the model, or ``None`` for no reference at all. ``False`` leaves
    TRL's own behaviour."""
    if reference is False:
        yield
        return
    from unittest import mock

    module = importlib.import_module(f"trl.trainer.{trainer_module}")
    with mock.patch.object(module, "create_model_from_path", lambda *a, **k: reference() if reference else None):
        yield


@contextlib.contextmanager
def whole_models():
    """Models built in the block are whole in this process. While a trainer under DeepSpeed ZeRO-3 exists,
    transformers builds every model sharded across the processes (a process-wide setting its config makes);
    a model used outside the engine (a scorer, a critic) must not be."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def suppress_new_head_warning():
    """A context in which loading a sequence classifier over a causal LM does not warn about its new head."""
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    return suppress_seqcls_warning()


def triple_preference_collator():
    """TRL's collator of [chosen; rejected; gold] batches (its experimental TPO trainer's)."""
    from trl.experimental.tpo.tpo_trainer import DataCollatorForTriplePreference

    return DataCollatorForTriplePreference


def grpo_logger_name() -> str:
    """The name of GRPOTrainer's module logger."""
    return importlib.import_module("trl.trainer.grpo_trainer").logger.name
