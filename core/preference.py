"""The preference stage: data and model in, a trained adapter/model and its metrics out."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from .data import load_splits
from .errors import UserError
from .models import gpu_supports_bf16, load_model, load_tokenizer, resolve_model_path
from .rewards import score
from .sampling import sample
from .trainer import PreferenceTrainer
from .registry import required_columns
from .validate import Plan

STAGE = "preference"
HELDOUT_KEYS = {
    "loss": "loss",
    "rewards/accuracies": "preference_accuracy",
    "rewards/margins": "reward_margin",
    "logps/accuracies": "logp_accuracy",
}


def platform_defaults(chosen: dict) -> dict:
    """TRL config values that suit the hardware, for the keys the recipe (``chosen``) leaves unset."""
    import torch

    defaults = {"report_to": "none", "logging_steps": 10, "save_strategy": "steps"}
    if not torch.cuda.is_available():
        # TRL defaults to bf16 and gradient checkpointing, which on a CPU are slow or need use_cpu.
        defaults.update(use_cpu=True, bf16=False)
        if "gradient_checkpointing" not in chosen:  # the deprecated name, honoured when the recipe uses it
            defaults["activation_checkpointing"] = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # CPU processes (torchrun, accelerate, DeepSpeed)
            defaults["ddp_backend"] = "gloo"
    elif not gpu_supports_bf16():
        defaults.update(bf16=False, fp16=True)
    return defaults


class MetricsWriter(TrainerCallback):
    """Appends one JSON line per logged step to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class Progress(ProgressCallback):
    """The usual progress bar, with the latest loss and margin in it instead of printed dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: logs[k] for k in ("loss", "rewards/margins", "rewards/accuracies") if k in logs}
            if shown:
                self.training_bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in shown.items()})


def heldout_metrics(trainer) -> dict:
    raw = trainer.evaluate()
    return {ours: raw[f"eval_{theirs}"] for theirs, ours in HELDOUT_KEYS.items() if f"eval_{theirs}" in raw}


def answer_metrics(plan: Plan, trainer, heldout) -> dict | None:
    """Greedy answers to held-out prompts, scored by the enabled reward plugins."""
    n = plan.recipe.eval.generate
    if n == 0 or heldout is None or "prompt" not in heldout.column_names:
        return None
    if not plan.plugins.implementers("posttrain_reward"):
        return None
    ds_plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    if ds_plugin is not None and ds_plugin.zero_stage == 3:
        return {"skipped": "greedy answers are not generated under DeepSpeed ZeRO-3 (the weights are sharded)"}
    subset = heldout.select(range(min(n, len(heldout))))
    prompts = subset["prompt"]
    model = trainer.accelerator.unwrap_model(trainer.model)
    generation = {"max_new_tokens": plan.recipe.eval.max_new_tokens, "do_sample": False}
    completions = [c[0] for c in sample(plan.plugins, model, trainer.processing_class, prompts, 1, generation)]
    columns = {c: subset[c] for c in subset.column_names}
    rewards = score(plan.plugins, prompts, completions, columns)
    scored = [r for r in rewards.total if r is not None]
    if not scored:
        return None
    out = {
        "n": len(scored),
        "answer_accuracy": sum(r > 0 for r in scored) / len(scored),
        "mean_reward": sum(scored) / len(scored),
        "by_source": {name: sum(s for s in v if s is not None) / max(1, sum(s is not None for s in v))
                      for name, v in rewards.by_source.items()},
        "examples": [{"prompt": _text(p), "completion": c, "reward": r}
                     for p, c, r in list(zip(prompts, completions, rewards.total))[:3]],
    }
    return out


class BeforeEvaluation(TrainerCallback):
    """Evaluates the starting model when training begins, and writes eval_before.json.

    At ``on_train_begin`` the model is already wrapped for the run's backend (DDP, DeepSpeed,
    FSDP) and no step has been taken; evaluating earlier fails under DeepSpeed ZeRO-1/2, which has
    no inference engine before training."""

    def __init__(self, plan: Plan, trainer, heldout, path: Path, main: bool):
        self.plan, self.trainer, self.heldout, self.path, self.main = plan, trainer, heldout, path, main
        self.result: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.plan.recipe.eval.before and self.heldout is not None:
            self.result = {"heldout": heldout_metrics(self.trainer),
                           "answers": answer_metrics(self.plan, self.trainer, self.heldout)}
        if self.main:
            self.path.write_text(json.dumps(self.result, indent=2))


def _text(prompt) -> str:
    if isinstance(prompt, list):
        return " | ".join(str(m.get("content", "")) for m in prompt)
    return str(prompt)


def _transform(plan: Plan, dataset, split: str):
    if dataset is None:
        return None
    out, last = plan.plugins.chain("posttrain_transform_dataset", "dataset", dataset, split=split, stage=STAGE)
    if len(out) == 0 and last is not None:
        raise UserError(f"the {split} data is empty after plugin '{last}' transformed it", field=f"plugins.{last}",
                        fix=f"relax the options of '{last}' or use more data")
    return out


def build_trainer(plan: Plan, run_dir: Path):
    recipe = plan.recipe
    train, heldout = load_splits(recipe, required_columns(plan.plugins, STAGE))
    train = _transform(plan, train, "train")
    heldout = _transform(plan, heldout, "eval")
    if len(train) == 0:
        raise UserError("the training data is empty", field="data.source", fix="point data.source at some examples")
    if heldout is not None and len(heldout) == 0:
        raise UserError("the held-out data is empty", field="data.eval",
                        fix="use a larger data.eval.fraction, another data.eval source/split, or fraction: 0 for none")

    from trl import DPOConfig

    path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(recipe, path)
    model, peft_config = load_model(recipe, path)
    trl_values = {**platform_defaults(plan.trl_config), **plan.trl_config}
    config = DPOConfig(output_dir=str(run_dir), seed=recipe.seed, **trl_values)
    callbacks = [MetricsWriter(run_dir / "metrics.jsonl")]
    for extra in plan.plugins.call("posttrain_callbacks", stage=STAGE, recipe=recipe.to_dict()):
        callbacks.extend(extra or [])
    trainer = PreferenceTrainer(model=model, args=config, train_dataset=train, eval_dataset=heldout,
                                processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
                                plugins=plan.plugins, stage=STAGE)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(Progress)
    return trainer, heldout


def last_checkpoint(run_dir: Path) -> Path | None:
    ckpts = [p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1])) if ckpts else None


def _trim_metrics(run_dir: Path, upto_step: int) -> None:
    """On resume, forget the metric lines logged after the checkpoint (they are logged again)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= upto_step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def run_stage(plan: Plan, run_dir: Path, resume: bool) -> dict:
    """Build, evaluate, train, save, evaluate, summarise. In a distributed launch every rank runs
    this (training and evaluation are collective); only the main process writes files."""
    trainer, heldout = build_trainer(plan, run_dir)
    main = trainer.is_world_process_zero()
    before_path = run_dir / "eval_before.json"
    checkpoint = last_checkpoint(run_dir) if resume else None
    if main:
        if checkpoint is not None:
            _trim_metrics(run_dir, int(checkpoint.name.split("-")[-1]))
        else:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    evaluation = BeforeEvaluation(plan, trainer, heldout, before_path, main)
    if checkpoint is not None and before_path.exists():
        evaluation.result = json.loads(before_path.read_text())
    else:
        trainer.add_callback(evaluation)

    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    before = evaluation.result
    train_seconds = time.time() - started
    final_dir = run_dir / "final"
    trainer.save_model(str(final_dir))

    after = {}
    if heldout is not None:
        after = {"heldout": heldout_metrics(trainer), "answers": answer_metrics(plan, trainer, heldout)}
    logs = [h for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]
    summary = {
        "recipe": plan.recipe.name,
        "stage": STAGE,
        "plugins": list(plan.plugins.by_name),
        "global_step": trainer.state.global_step,
        "world_size": trainer.args.world_size,
        "resumed_from": checkpoint.name if checkpoint else None,
        "train_seconds_this_session": round(train_seconds, 1),
        "train_loss": result.training_loss if not math.isnan(result.training_loss) else None,
        "last_logged": logs[-1] if logs else {},
        "heldout_pairs": len(heldout) if heldout is not None else 0,
        "before": before,
        "after": after,
        "final_model": str(final_dir),
    }
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _close_process_group()
    return summary


def _close_process_group() -> None:
    """Tear down the distributed process group of a multi-process run. Left to interpreter exit,
    its communication threads can abort the process ("terminate called without an active
    exception") after a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
