"""A stage's training run on one TRL trainer, top to bottom: build, evaluate before, train, save, evaluate
after, summarise (:func:`run_training`), with what it counts on the way (rows TRL dropped or cut at
``max_length``) and what a resume needs (the newest complete checkpoint, the metrics logged after it).

A stage hands :func:`run_training` its trainer module (``posttrain.trainers.<stage>``), which has:

- ``build_trainer(plan, run_dir) -> (trainer, heldout)``: the TRL trainer subclass, ready to
  train, and the held-out dataset (or ``None``);
- ``heldout_metrics(plan, trainer, heldout) -> dict``: the stage's own held-out numbers (the
  preference stage's TRL evaluation; nothing extra online);
- ``summary_extras(trainer) -> dict``: stage-specific entries of ``summary.json``;
- optionally ``rows_cut(trainer, split, dataset)``, ``rows_kept(trainer, split)`` and ``DROPPED``
  (see :func:`count_truncation` and :func:`count_tokenisation_drops`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..errors import UserError
from ..validate import Plan
from .callbacks import BeforeEvaluation
from .evaluation import evaluate, zero_stage

FROM_SHARDS = ("gathered from the DeepSpeed ZeRO-3 shards in the engine's dtype (stage3_gather_16bit_weights_on_"
               "model_save); the float32 masters are in the last checkpoint's ZeRO files (zero_to_fp32)")


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
        **({"final_model_from": FROM_SHARDS} if zero_stage(trainer) == 3 else {}),
        **({"hub_upload": upload} if upload is not None else {}),
    }
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if upload is not None and not upload["uploaded"]:
            print(f"posttrain: the upload to the hub failed ({upload['error']}); the model is kept in {final_dir}: "
                  f"upload it later with `hf upload {upload['repo'] or 'REPO_ID'} {final_dir}`", flush=True)
    return summary


def last_checkpoint(run_dir: Path, say=print) -> Path | None:
    """The newest complete checkpoint of a run folder (incomplete ones are skipped and said; see
    posttrain.checkpoints)."""
    from ..checkpoints import newest_complete

    return newest_complete(Path(run_dir), say=say)


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


def _splits(trainer):
    """The trainer's prepared splits that are one dataset with a length, by name (``train``, ``eval``)."""
    for split, dataset in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        if dataset is not None and hasattr(dataset, "__len__") and not isinstance(dataset, dict):
            yield split, dataset


def _trim_metrics(run_dir: Path, upto_step: int) -> None:
    """On resume, forget the metric lines logged after the checkpoint (they are logged again)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= upto_step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def raise_if_stopped(trainer, stage: str, run_dir: Path) -> None:
    """After trainer.train(): if it stopped on a signal, end the stage there (Preempted)."""
    from ..process import Preempted, stop_requested

    if getattr(trainer, "_posttrain_stopped", False):
        step = trainer.state.global_step
        folder = Path(trainer.args.output_dir) / f"checkpoint-{step}"
        raise Preempted(stage, step, folder, run_dir, stop_requested() or "a signal")
