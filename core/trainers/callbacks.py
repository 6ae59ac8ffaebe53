"""The callbacks every trainer carries: metrics.jsonl, the progress bar, the stop on a signal, the
reference update, and the evaluation of the starting model."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..validate import Plan
from .evaluation import evaluate


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


class BeforeEvaluation(TrainerCallback):
    """Evaluates the starting model when training begins, and writes eval_before.json.

    At ``on_train_begin`` the model is already wrapped for the run's backend (DDP, DeepSpeed,
    FSDP) and no step has been taken; evaluating earlier fails under DeepSpeed ZeRO-1/2, which has
    no inference engine before training."""

    def __init__(self, trainer_module, plan: Plan, trainer, heldout, path: Path, main: bool):
        self.trainer_module, self.plan, self.trainer, self.heldout = trainer_module, plan, trainer, heldout
        self.path, self.main = path, main
        self.result: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.plan.recipe.eval.before:
            self.result = evaluate(self.trainer_module, self.plan, self.trainer, self.heldout)
        if self.main:
            self.path.write_text(json.dumps(self.result, indent=2))


def trainer_callbacks(plan: Plan, run_dir: Path) -> list:
    callbacks = [MetricsWriter(run_dir / "metrics.jsonl")]
    for extra in plan.plugins.call("posttrain_callbacks", stage=plan.recipe.stage, recipe=plan.recipe.to_dict()):
        callbacks.extend(extra or [])
    return callbacks
