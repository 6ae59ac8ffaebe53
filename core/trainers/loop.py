"""What every trainer shares: the training run (build, evaluate before, train, save, evaluate after,
summarise), precision and the non-finite guard of every trainer, the metric and progress callbacks,
and the held-out greedy-answer evaluation.

A stage that trains on one TRL trainer hands :func:`run_training` its trainer module, which has three
functions:

- ``build_trainer(plan, run_dir) -> (trainer, heldout)``: the TRL trainer subclass, ready to
  train, and the held-out dataset (or ``None``);
- ``heldout_metrics(plan, trainer, heldout) -> dict``: the stage's own held-out numbers (the
  preference stage's TRL evaluation; nothing extra online);
- ``summary_extras(trainer) -> dict``: stage-specific entries of ``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..errors import UserError
from ..types import Transformed
from ..rewards import score
from ..sampling import derive_seed, sample_completions
from ..models import Precision, cast_trained_weights
from ..process import world_size
from ..validate import Plan
from .integrations import hub_errors, short_error, tracker_environment
from .prompts import limit_prompts, run_prompt_form

def platform_defaults(chosen: dict) -> dict:
    """TRL config values that suit the hardware, for the keys the recipe (``chosen``) leaves unset.

    On a GPU, activation (gradient) checkpointing is on, as in TRL: it trades about a third more
    compute per step for activations that no longer grow with the number of layers. Turn it off
    (``training.activation_checkpointing: false``) when the batch fits without it, for speed.
    On a CPU it is off (memory is rarely the limit there, time is).
    """
    import torch

    defaults = {"report_to": "none", "logging_steps": 10, "save_strategy": "steps"}
    checkpointing_set = "gradient_checkpointing" in chosen or "activation_checkpointing" in chosen
    if not torch.cuda.is_available():
        defaults["use_cpu"] = True  # TRL's bf16 autocast on a CPU works only with use_cpu
        if not checkpointing_set:
            defaults["activation_checkpointing"] = False
        if world_size() > 1:  # CPU processes (torchrun, accelerate, DeepSpeed)
            defaults["ddp_backend"] = "gloo"
    elif not checkpointing_set:
        defaults["activation_checkpointing"] = True
    return defaults


def trl_values(plan: Plan, precision: Precision, stage_defaults: dict | None = None) -> dict:
    """The TRL config values of a run: hardware defaults, then the stage's own, then the recipe's
    and the plugins' (``plan.trl_config``), and the autocast flags of the run's precision."""
    values = {**platform_defaults(plan.trl_config), **(stage_defaults or {}), **plan.trl_config, **precision.trl_flags}
    if values.get("deepspeed") is not None:
        values["deepspeed"] = engine_config(values["deepspeed"])
    return values


def engine_config(value) -> dict:
    """The DeepSpeed config a run hands to TRL (a copy; the recipe's file is not changed). Under ZeRO-3 each
    process holds a shard of every weight, so the final model is gathered from the shards when it is saved
    (DeepSpeed's ``stage3_gather_16bit_weights_on_model_save``, on unless the config says otherwise): ``final/``
    is then a Hugging Face model in the engine's dtype, as a one-process run writes it."""
    import copy

    from ..validate import deepspeed_config

    config = copy.deepcopy(deepspeed_config(value))
    zero = config.get("zero_optimization") or {}
    if zero.get("stage") == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
        config["zero_optimization"] = zero
    return config


def build_config(config_cls, plan: Plan, run_dir: Path, precision: Precision, stage_defaults: dict | None = None):
    """The stage's TRL config; TRL's own refusals become user errors (before any model is loaded)."""
    import torch

    if plan.trl_config.get("use_liger_kernel") and not torch.cuda.is_available():
        raise UserError("Liger's kernels are Triton GPU kernels: use_liger_kernel needs a CUDA GPU",
                        field="training.use_liger_kernel", fix="remove it on a machine without a GPU")
    values = trl_values(plan, precision, stage_defaults)
    tracker_environment(values.get("report_to"), run_dir)
    try:
        return config_cls(output_dir=str(run_dir), seed=plan.recipe.seed, **values)
    except ValueError as e:
        raise UserError(f"TRL refuses these settings: {e}", field="training",
                        fix=f"change the training values it names ({config_cls.__name__}; see docs/recipes.md)") from None


class NonFiniteTraining(UserError):
    """Training produced a non-finite loss or gradient norm; the weights were not updated with it."""

    keep_run_dir = True  # metrics.jsonl shows how the run got there


class FiniteGuard:
    """Watches every optimizer step of a trainer: the summed micro-batch losses and the gradient norm.

    It is checked where transformers has computed the gradient norm and not yet stepped the
    optimizer, so a non-finite step never reaches the weights. Under several processes the verdict
    is reduced over all of them (one scalar per step), so every rank stops at the same step.
    """

    def __init__(self):
        self.step_loss = None  # sum of this step's micro-batch losses (a tensor: no sync per micro-batch)
        self.last_finite: tuple[int, float, float | None] | None = None  # (step, loss, grad norm)

    def add_loss(self, loss) -> None:
        loss = loss.detach().float()
        self.step_loss = loss if self.step_loss is None else self.step_loss + loss

    def check(self, trainer, grad_norm) -> None:
        import torch

        step = trainer.state.global_step + 1
        loss = self.step_loss if self.step_loss is not None else torch.zeros((), device=trainer.args.device)
        self.step_loss = None
        norm = grad_norm if isinstance(grad_norm, torch.Tensor) else torch.tensor(
            float("nan") if grad_norm is None else float(grad_norm))
        if trainer.args.fp16:  # fp16's loss scaler skips overflowing steps itself: only the loss is ours to judge
            norm = torch.zeros(())
        values = torch.stack([loss.reshape(()).to(norm.device, torch.float32), norm.reshape(()).float()])
        bad = (~torch.isfinite(values)).any().float()
        if trainer.accelerator.num_processes > 1:
            bad = trainer.accelerator.reduce(bad.to(trainer.accelerator.device), reduction="sum")
        loss_value, norm_value = values.tolist()
        if grad_norm is None or trainer.args.fp16:
            norm_value = None
        if not bad.item():
            self.last_finite = (step, loss_value, norm_value)
            return
        raise self.error(trainer, step, loss_value, norm_value)

    def error(self, trainer, step: int, loss: float, norm: float | None) -> NonFiniteTraining:
        here = f"loss {loss:.6g}" + (f", gradient norm {norm:.6g}" if norm is not None else "")
        if self.last_finite is None:
            last = "no earlier step was finite in this session"
        else:
            s, l, n = self.last_finite
            last = f"the last finite step was {s} (loss {l:.6g}" + (f", gradient norm {n:.6g})" if n is not None else ")")
        checkpoint = last_checkpoint(Path(trainer.args.output_dir))
        kept = (f"the last checkpoint, {checkpoint.name}, is kept" if checkpoint is not None else
                "no checkpoint was written before it")
        resume = (f"--resume with the same recipe continues from {checkpoint.name} (a changed recipe is refused)"
                  if checkpoint is not None else "")
        local = all(math.isfinite(v) for v in (loss, norm) if v is not None)
        where = " here; another process had a non-finite one" if local else ""
        return NonFiniteTraining(
            f"training stopped at step {step}: non-finite values ({here}{where}); {last}. The weights were not "
            f"updated with step {step}; {kept}", field="training",
            fix="lower training.learning_rate, set training.max_grad_norm (e.g. 1.0), check the data and the reward "
                "sources; then start again with --overwrite" + (f", or {resume}" if resume else ""))


class SaveFailed(UserError):
    """A checkpoint could not be written (a full disk, no permission); the run stops, its folder kept."""

    keep_run_dir = True


class GuardedTrainer:
    """Mixed into every posttrain trainer (before its TRL base class): stops at the first non-finite
    loss or gradient norm, before the optimizer step, with a user error (exit 2); marks each checkpoint
    complete once all of it is written (posttrain.checkpoints); turns a failed save into a user error
    naming the folder and the free space."""

    def _save_extra(self, folder: Path) -> None:
        """What a trainer saves into a checkpoint besides TRL's files (the critic's state)."""

    def _run_epoch(self, *args, **kwargs):
        """transformers checks max_steps only after an optimizer step: a run resumed from a checkpoint at its
        last step (stopped after that save, before its summary) would train one step more than the same run
        uninterrupted. With nothing left to train, the epoch is not started."""
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        import shutil

        from ..checkpoints import mark_complete, newest_complete
        from ..process import barrier

        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
            self._save_extra(folder)
            barrier()  # every rank's files are written (DeepSpeed saves a shard per rank)
            if self.args.should_save:
                mark_complete(folder, self.state.global_step)
        except (OSError, RuntimeError) as e:
            # torch.save reports a write that failed half-way (a full disk) as a RuntimeError of its zip writer
            if isinstance(e, RuntimeError) and not any(w in str(e) for w in ("inline_container", "PytorchStreamWriter",
                                                                             "write", "No space")):
                raise
            try:
                free = f"{shutil.disk_usage(folder.parent).free / 2 ** 20:.1f} MiB free there"
            except OSError:
                free = "the free space could not be read"
            try:
                previous = newest_complete(folder.parent, say=lambda _: None)
            except UserError:
                previous = None
            kept = (f"the previous checkpoint, {previous.name}, is intact and --resume continues from it"
                    if previous is not None and previous != folder else "no earlier checkpoint was complete")
            raise SaveFailed(f"saving {folder} failed at step {self.state.global_step}: {type(e).__name__}: {e} "
                             f"({free}); {kept}", field="--output-dir",
                             fix="free space on that disk (or point --output-dir at a larger one, or raise "
                                 "training.save_steps / set training.save_total_limit), then run again with "
                                 "--resume") from None

    # -- the hub (push_to_hub): an upload that fails never ends the run --------------------------

    def init_hf_repo(self, token=None, private=None) -> None:
        """transformers creates the hub repository when the trainer is built: if the hub cannot be reached,
        training goes on (the upload is tried again at the end)."""
        try:
            super().init_hf_repo(token=token, private=private)
        except hub_errors() as e:
            self.hub_model_id = None
            print(f"posttrain: warning: the hub repository could not be created ({short_error(e)}); training goes "
                  "on and the upload is tried again at the end", flush=True)

    def _push_from_checkpoint(self, checkpoint_folder) -> None:
        """A checkpoint's upload (hub_strategy): skipped without a hub repository; a failure is said, not raised."""
        if getattr(self, "hub_model_id", None) is None:
            return
        try:
            super()._push_from_checkpoint(checkpoint_folder)
        except hub_errors() as e:
            print(f"posttrain: warning: uploading {Path(checkpoint_folder).name} to the hub failed "
                  f"({short_error(e)}); training goes on", flush=True)

    def push_to_hub(self, *args, **kwargs):
        """The upload at the end (transformers pushes when the final model is saved): a failure, creating the
        repository included, is recorded in ``hub_upload`` (run_training says it); the model stays in the run
        directory."""
        try:
            if getattr(self, "hub_model_id", None) is None:  # not created when the trainer was built
                super().init_hf_repo(token=kwargs.get("token"), private=kwargs.get("private"))
            result = super().push_to_hub(*args, **kwargs)
        except hub_errors() as e:
            self.hub_upload = {"uploaded": False, "repo": self.args.hub_model_id, "error": short_error(e)}
            return None
        self.hub_upload = {"uploaded": True, "repo": getattr(self, "hub_model_id", None)}
        return result

    def _finite_guard(self) -> FiniteGuard:
        if getattr(self, "_posttrain_finite", None) is None:
            self._posttrain_finite = FiniteGuard()
        return self._posttrain_finite

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._finite_guard().add_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self._finite_guard().check(self, grad_norm)
        return grad_norm

    # TRL's method whose paper the model card (the README.md TRL writes into the run directory) cites, for
    # the plugins that are that method
    _METHOD_OF_TRAINER = {"preference": ("posttrain_preference_loss", "dpo"),
                          "iterative": ("posttrain_preference_loss", "dpo"),
                          "online": ("posttrain_advantage_estimate", "group_relative")}

    def create_model_card(self, *args, **kwargs):
        """TRL's model card, naming what trained the model: posttrain's stage on TRL's trainer, the plugin
        that owns the loss or advantage, the enabled plugins (TRL's own says e.g. "trained with DPO" whatever
        the loss was); TRL's method paper is cited only when the plugins are that method."""
        plugins = getattr(self, "plugins", None)
        if plugins is None:
            return super().create_model_card(*args, **kwargs)
        stage = getattr(self, "stage", "?")
        hook, same = self._METHOD_OF_TRAINER.get(stage, (None, None))
        owner = (plugins.implementers(hook) or [None])[0] if hook else None
        parts = [f"loss: {owner}" if hook == "posttrain_preference_loss" else
                 f"advantage: {owner}" if hook else None,
                 f"plugins: {', '.join(plugins.by_name) or 'none'}"]
        trl_class = next((c.__name__ for c in type(self).__mro__ if c.__module__.startswith("trl.")), "trainer")
        name = (f"posttrain's {stage} stage on TRL's {trl_class} ("
                + "; ".join(p for p in parts if p) + ")")
        saved = self._name, self._paper
        self._name = name
        if hook is not None and owner != same:
            self._paper = {}
        try:
            return super().create_model_card(*args, **kwargs)
        finally:
            self._name, self._paper = saved


class MetricsWriter(TrainerCallback):
    """Appends one JSON line per logged step to metrics.jsonl (with ``extra``, e.g. an iterative
    stage's round, in every line)."""

    def __init__(self, path: Path):
        self.path = path
        self.extra: dict = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {**self.extra, "step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class Progress(ProgressCallback):
    """The usual progress bar, with the latest headline metrics in it instead of printed dicts."""

    shown = ("loss", "rewards/margins", "rewards/accuracies", "reward")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            # a step whose every completion abstained logs its reward as None: show "-"
            shown = {k.split("/")[-1]: ("-" if not isinstance(logs[k], (int, float)) else f"{logs[k]:.3g}")
                     for k in self.shown if k in logs}
            if shown:
                self.training_bar.set_postfix(shown)


class ReferenceUpdateCallback(TrainerCallback):
    """Calls ``posttrain_update_reference`` after every optimizer step (both trainers add it when a
    plugin implements the hook)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.plugins.call("posttrain_update_reference", trainer=self.trainer, event="step",
                                  step=state.global_step)


def transform(plan: Plan, dataset, split: str):
    """Pass a split through the ``posttrain_transform_dataset`` chain."""
    if dataset is None:
        return None
    def record(plugin, before, after, reason):
        entry = {"plugin": plugin, "split": split, "rows_in": len(before), "rows_out": len(after)}
        if reason:
            entry["reason"] = reason
        plan.data_log.append(entry)
        why = f": {reason}" if reason else ""
        print(f"posttrain: {plugin} kept {entry['rows_out']} of {entry['rows_in']} {split} rows "
              f"(dropped {entry['rows_in'] - entry['rows_out']}{why})", flush=True)

    def unwrap(result):
        return (result.dataset, result.reason) if isinstance(result, Transformed) else (result, None)

    out, last = plan.plugins.chain("posttrain_transform_dataset", "dataset", dataset, on_step=record, unwrap=unwrap,
                                   split=split, stage=plan.recipe.stage)
    if len(out) == 0 and last is not None:
        raise UserError(f"the {split} data is empty after plugin '{last}' transformed it", field=f"plugins.{last}",
                        fix=f"relax the options of '{last}' or use more data")
    return out


def load_data(plan: Plan):
    """Training and held-out splits, loaded, checked and transformed by the plugins."""
    from ..data import load_splits, source_counts
    from ..registry import required_columns

    plan.data_sources = []
    train, heldout, log = load_splits(plan.recipe, required_columns(plan.plugins, plan.recipe.stage), plan.plugins,
                                      run_prompt_form(plan), plan.data_sources)
    for entry in plan.data_sources if isinstance(plan.recipe.data.source, list) else ():
        print(f"posttrain: data source {source_counts(entry)}", flush=True)
    for entry in log:
        plan.data_log.append(entry)
        dropped = entry["rows_in"] - entry["rows_out"]
        what = f"kept {entry['rows_out']} of {entry['rows_in']} {entry['split']} rows: " if dropped else \
            f"{entry['split']} data: "
        print(f"posttrain: {what}{entry['reason']}", flush=True)
    train, heldout = transform(plan, train, "train"), transform(plan, heldout, "eval")
    plan.data_sizes = {"train": len(train), "eval": len(heldout) if heldout is not None else None}
    if len(train) == 0:
        raise UserError("the training data is empty", field="data.source", fix="point data.source at some examples")
    if heldout is not None and len(heldout) == 0:
        raise UserError("the held-out data is empty", field="data.eval",
                        fix="use a larger data.eval.fraction, another data.eval source/split, or fraction: 0 for none")
    from ..checkpoints import data_checked

    data_checked()  # an earlier run this one replaces (--overwrite) is deleted only now
    return train, heldout


@dataclass
class Parts:
    """What a stage's trainer is built from."""

    train: Any  # the training split, loaded, checked and transformed by the plugins
    heldout: Any  # the held-out split, or None
    precision: Precision
    config: Any  # the TRL config
    path: str  # the starting model's folder (or hub id)
    tokenizer: Any
    model: Any  # the policy (or the reward model), float32 masters, 4/8-bit base when asked
    peft_config: Any  # the LoRA config TRL applies, or None
    callbacks: list  # posttrain's metric writer and the plugins' callbacks


def trainer_parts(plan: Plan, run_dir: Path, config_cls=None, *, config=None, reward_head: bool = False) -> Parts:
    """The data, precision, TRL config (``config_cls`` built from the plan, or a ready ``config(precision)``),
    tokenizer, model and callbacks every trainer starts from."""
    from ..models import load_model, load_tokenizer, resolve_model_path, run_precision

    recipe = plan.recipe
    train, heldout = load_data(plan)
    precision = run_precision(recipe)
    trl_config = config(precision) if config is not None else build_config(config_cls, plan, run_dir, precision)
    path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(recipe, path)
    train = limit_prompts(plan, train, tokenizer, "train")
    heldout = limit_prompts(plan, heldout, tokenizer, "eval")
    model, peft_config = load_model(recipe, path, precision, reward_head=reward_head)
    return Parts(train, heldout, precision, trl_config, path, tokenizer, model, peft_config,
                 trainer_callbacks(plan, run_dir))


def trainer_callbacks(plan: Plan, run_dir: Path) -> list:
    callbacks = [MetricsWriter(run_dir / "metrics.jsonl")]
    for extra in plan.plugins.call("posttrain_callbacks", stage=plan.recipe.stage, recipe=plan.recipe.to_dict()):
        callbacks.extend(extra or [])
    return callbacks


def finish_trainer(trainer, precision: Precision):
    """What every stage does to its trainer once TRL has built it: trained weights in the trained
    dtype (float32 masters; DeepSpeed keeps its own), and our progress bar instead of printed dicts."""
    if not trainer.is_deepspeed_enabled:
        cast_trained_weights(trainer.model, precision)
    trainer.precision = precision
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(Progress)
    trainer.add_callback(StopCallback(trainer))
    return trainer


def _text(prompt) -> str:
    if isinstance(prompt, list):
        return " | ".join(str(m.get("content", "")) for m in prompt)
    return str(prompt)


def answer_metrics(plan: Plan, trainer, heldout) -> dict | None:
    """Greedy answers to held-out prompts, scored by the enabled reward plugins (the trainer's model)."""
    from ..reward_function import trl_keywords

    if not plan.recipe.eval.generate or heldout is None:
        return None
    with generation_model(trainer) as model, trl_keywords(trainer_state=trainer.state):
        return greedy_answers(plan, model, trainer.processing_class, heldout, trainer.accelerator.autocast())


@contextlib.contextmanager
def generation_model(trainer):
    """The trainer's policy to generate with. Under DeepSpeed ZeRO-3 each process holds a shard of every
    weight: every process gathers the whole model for the time of the block (TRL's
    unwrap_model_for_generation, as its own trainers generate), then generates on its own. Elsewhere the
    unwrapped model as it is."""
    if _zero_stage(trainer) == 3:
        from trl.models import unwrap_model_for_generation

        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator, gather_deepspeed3_params=True,
                                         gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs) \
                as model:
            yield model
        return
    yield trainer.accelerator.unwrap_model(trainer.model)


def greedy_answers(plan: Plan, model, tokenizer, heldout, autocast) -> dict | None:
    """Greedy answers of ``model`` to ``eval.generate`` held-out prompts (under ``autocast``, the compute
    dtype), scored by the enabled reward plugins; None without prompts or reward plugins."""
    n = plan.recipe.eval.generate
    if n == 0 or heldout is None or "prompt" not in heldout.column_names:
        return None
    if not plan.plugins.implementers("posttrain_reward"):
        return None
    subset = heldout.select(range(min(n, len(heldout))))
    prompts = list(subset["prompt"])  # a list, as in every other call of posttrain_sample (not a datasets Column)
    generation = {"max_new_tokens": plan.recipe.eval.max_new_tokens, "do_sample": False}
    with autocast:
        samples = sample_completions(plan.plugins, model, tokenizer, prompts, 1, generation,
                                     seed=derive_seed(plan.recipe.seed, "heldout"))
    completions = [c[0] for c in samples.texts]
    columns = {c: subset[c] for c in subset.column_names}
    rewards = score(plan.plugins, prompts, completions, columns, [i[0] for i in samples.ids],
                    [t[0] for t in samples.truncated])
    scored = [r for r in rewards.total if r is not None]
    if not scored:
        return None
    return {
        "n": len(scored),
        "answer_accuracy": sum(r > 0 for r in scored) / len(scored),
        "mean_reward": sum(scored) / len(scored),
        "by_source": {name: sum(s for s in v if s is not None) / max(1, sum(s is not None for s in v))
                      for name, v in rewards.by_source.items()},
        "examples": [{"prompt": _text(p), "completion": c, "reward": r}
                     for p, c, r in list(zip(prompts, completions, rewards.total))[:3]],
    }


def evaluate(stage, plan: Plan, trainer, heldout) -> dict:
    """The held-out numbers of the stage, and the greedy answers scored by the reward plugins."""
    if heldout is None:
        return {}
    return {"heldout": stage.heldout_metrics(plan, trainer, heldout),
            "answers": answer_metrics(plan, trainer, heldout)}


class BeforeEvaluation(TrainerCallback):
    """Evaluates the starting model when training begins, and writes eval_before.json.

    At ``on_train_begin`` the model is already wrapped for the run's backend (DDP, DeepSpeed,
    FSDP) and no step has been taken; evaluating earlier fails under DeepSpeed ZeRO-1/2, which has
    no inference engine before training."""

    def __init__(self, stage, plan: Plan, trainer, heldout, path: Path, main: bool):
        self.stage, self.plan, self.trainer, self.heldout, self.path, self.main = stage, plan, trainer, heldout, path, main
        self.result: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.plan.recipe.eval.before:
            self.result = evaluate(self.stage, self.plan, self.trainer, self.heldout)
        if self.main:
            self.path.write_text(json.dumps(self.result, indent=2))


def last_checkpoint(run_dir: Path, say=print) -> Path | None:
    """The newest complete checkpoint of a run folder (incomplete ones are skipped and said; see
    posttrain.checkpoints)."""
    from ..checkpoints import newest_complete

    return newest_complete(Path(run_dir), say=say)


class StopCallback(TrainerCallback):
    """At the end of every optimizer step: when this process or another was asked to stop (SIGTERM,
    SIGINT), save a checkpoint and end training there, on every rank at the same step."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        from ..process import stop_agreed

        if stop_agreed(self.trainer.accelerator.device):
            control.should_save = True
            control.should_training_stop = True
            self.trainer._posttrain_stopped = True


def raise_if_stopped(trainer, stage: str, run_dir: Path) -> None:
    """After trainer.train(): if it stopped on a signal, end the stage there (Preempted)."""
    from ..process import Preempted, stop_requested

    if getattr(trainer, "_posttrain_stopped", False):
        step = trainer.state.global_step
        folder = Path(trainer.args.output_dir) / f"checkpoint-{step}"
        raise Preempted(stage, step, folder, run_dir, stop_requested() or "a signal")


def _trim_metrics(run_dir: Path, upto_step: int) -> None:
    """On resume, forget the metric lines logged after the checkpoint (they are logged again)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= upto_step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _splits(trainer):
    """The trainer's prepared splits that are one dataset with a length, by name (``train``, ``eval``)."""
    for split, dataset in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        if dataset is not None and hasattr(dataset, "__len__") and not isinstance(dataset, dict):
            yield split, dataset


def count_tokenisation_drops(module, plan: Plan, trainer) -> None:
    """Rows TRL's tokenisation dropped (pairs longer than max_length in a reward model, examples left with
    nothing to train on after truncation...), per split, printed and written to summary.json; a training split
    left empty is an error (exit 2) naming training.max_length. A trainer module whose prepared rows are not its
    examples (sft with packing) says how many examples it kept with ``rows_kept(trainer, split)``."""
    kept = getattr(module, "rows_kept", None)
    max_length = getattr(trainer.args, "max_length", None)
    why = getattr(module, "DROPPED", "dropped by TRL's tokenisation at training.max_length = {max_length} tokens")
    for split, dataset in _splits(trainer):
        before = plan.data_sizes.get(split)
        after = kept(trainer, split) if kept is not None else None
        if after is None and getattr(trainer.args, "packing", False):
            continue  # packed rows are not examples
        after = len(dataset) if after is None else after
        if before is None:
            continue
        if after >= before:
            continue
        reason = why.format(max_length=max_length)
        plan.data_log.append({"plugin": plan.stage.trainer,
                              "split": split, "rows_in": before, "rows_out": after, "reason": reason})
        print(f"posttrain: warning: kept {after} of {before} {split} rows: {before - after} {reason}", flush=True)
        if after == 0:
            raise UserError(f"every {split} row was dropped: {reason}", field="training.max_length",
                            fix="raise training.max_length (or shorten the data); `posttrain estimate` shows what a "
                                "longer one costs in memory")


def token_lengths(dataset, column: str):
    """The number of tokens in each row of a tokenised column (a numpy array), read from Arrow without building
    Python lists."""
    import pyarrow.compute as pc

    table = dataset.select_columns([column]).with_format("arrow")[:]
    return pc.list_value_length(table[column]).to_numpy(zero_copy_only=False)


def count_truncation(module, plan: Plan, trainer) -> dict | None:
    """Rows whose tokens TRL cuts at training.max_length (they train, on their first max_length tokens), per
    split: one warning line each, an entry in summary.json's ``data_transforms`` (``rows_cut``) and the counts
    returned for its ``rows_cut_at_max_length``. The trainer module counts them with ``rows_cut(trainer, split,
    dataset) -> (rows cut, rows, how)``; None for a module without it (a trainer that does not truncate)."""
    counter = getattr(module, "rows_cut", None)
    if counter is None:
        return None
    max_length = getattr(trainer.args, "max_length", None)
    counts = {}
    for split, dataset in _splits(trainer):
        counted = counter(trainer, split, dataset) if max_length is not None else (0, len(dataset), "")
        if counted is None:
            continue
        cut, rows, how = counted
        counts[split] = int(cut)
        if not cut:
            continue
        reason = f"cut to training.max_length = {max_length} tokens ({how})"
        plan.data_log.append({"plugin": plan.stage.trainer, "split": split, "rows_in": rows, "rows_out": rows,
                              "rows_cut": int(cut),
                              "reason": f"rows {reason}: their tokens past it are not trained on"})
        print(f"posttrain: warning: {cut} of {rows} {split} rows {reason}", flush=True)
    return counts


def run_training(stage, module, plan: Plan, run_dir: Path, resume: bool) -> dict:
    """Build, evaluate, train, save, evaluate, summarise, with the trainer ``module`` of ``stage``. In a
    distributed launch every rank runs this (training and evaluation are collective); only the main process
    writes files. Returns the summary (also written to ``summary.json``)."""
    trainer, heldout = module.build_trainer(plan, run_dir)
    count_tokenisation_drops(module, plan, trainer)
    rows_cut = count_truncation(module, plan, trainer)
    main = trainer.is_world_process_zero()
    before_path = run_dir / "eval_before.json"
    checkpoint = last_checkpoint(run_dir) if resume else None
    if main:
        if checkpoint is not None:
            _trim_metrics(run_dir, int(checkpoint.name.split("-")[-1]))
        else:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    evaluation = BeforeEvaluation(module, plan, trainer, heldout, before_path, main)
    if checkpoint is not None and before_path.exists():
        evaluation.result = json.loads(before_path.read_text())
    else:
        trainer.add_callback(evaluation)

    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    raise_if_stopped(trainer, stage.name, run_dir)
    train_seconds = time.time() - started
    final_dir = run_dir / "final"
    trainer.save_model(str(final_dir))  # with push_to_hub, transformers uploads here (GuardedTrainer.push_to_hub)
    upload = getattr(trainer, "hub_upload", None) if trainer.args.push_to_hub else None
    if upload is not None and not upload["uploaded"]:
        upload["kept"] = str(final_dir)

    after = evaluate(module, plan, trainer, heldout)
    logs = [h for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]
    summary = {
        "recipe": plan.recipe.name,
        "stage": stage.name,
        "plugins": list(plan.plugins.by_name),
        "global_step": trainer.state.global_step,
        "world_size": trainer.args.world_size,
        "resumed_from": checkpoint.name if checkpoint else None,
        "train_seconds_this_session": round(train_seconds, 1),
        "train_loss": result.training_loss if not math.isnan(result.training_loss) else None,
        "last_logged": logs[-1] if logs else {},
        "heldout_examples": len(heldout) if heldout is not None else 0,
        "data_transforms": plan.data_log,
        "data_sources": plan.data_sources,
        "prompts": plan.prompt_form.describe() if plan.prompt_form is not None else None,
        **({"rows_cut_at_max_length": rows_cut} if rows_cut is not None else {}),
        **module.summary_extras(trainer),
        "before": evaluation.result,
        "after": after,
        "final_model": str(final_dir),
        **({"final_model_from": FROM_SHARDS} if _zero_stage(trainer) == 3 else {}),
        **({"hub_upload": upload} if upload is not None else {}),
    }
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if upload is not None and not upload["uploaded"]:
            print(f"posttrain: the upload to the hub failed ({upload['error']}); the model is kept in {final_dir}: "
                  f"upload it later with `hf upload {upload['repo'] or 'REPO_ID'} {final_dir}`", flush=True)
    return summary


FROM_SHARDS = ("gathered from the DeepSpeed ZeRO-3 shards in the engine's dtype (stage3_gather_16bit_weights_on_"
               "model_save); the float32 masters are in the last checkpoint's ZeRO files (zero_to_fp32)")


def _zero_stage(trainer) -> int | None:
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    return plugin.zero_stage if plugin is not None else None
