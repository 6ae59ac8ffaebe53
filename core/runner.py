"""Running a loaded recipe: its stages in order, each in its run directory (:mod:`posttrain.run_dirs`),
through the stage's own ``Stage.run`` (which imports its trainer); a pipeline's finished stages are
skipped, each stage's output is published for the stages after it (``stages.NAME``), and the lm-eval
benchmarks a recipe asks for are run before and after.

A stage's output is its ``final/`` model (full fine-tuning) or, with LoRA in a pipeline, ``merged/``: the
adapter merged into the weights it was trained on (a 4-bit base is dequantised first), saved once in
``merged_dtype``. A one-stage recipe's run directory is the stage's own; a pipeline's holds one per stage.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from . import process, stage_refs
from .checkpoints import restore_set_aside
from .errors import UserError
from .pipeline import Pipeline, PipelineStage, load, prefixed
from .recipe import Recipe
from .run_dirs import AFTER_FILE, BEFORE_FILE, prepare_pipeline_dir, prepare_run_dir, prepare_stage_dir
from .stage import StageResult


def run(recipe_path: str, overrides: list[str], output_dir: str | None = None, *, removals: list[str] = (),
        resume: bool = False, overwrite: bool = False, start_from: str | None = None) -> tuple[Path, dict]:
    """Load, validate and run a recipe; returns the run directory and its summary. A run stopped by a signal
    raises :class:`posttrain.process.Preempted` after its checkpoint is saved, and leaves ``preempted.json``
    in the run directory (and the pipeline's)."""
    pipeline = load(recipe_path, overrides, removals)
    top = pipeline.folder(output_dir)
    try:
        return run_pipeline(pipeline, top, resume=resume, overwrite=overwrite, start_from=start_from)
    except process.Preempted as stop:
        stop.top = top
        if process.is_main():
            record = {"signal": stop.signal_name, "stage": stop.stage, "step": stop.step,
                      "checkpoint": str(stop.checkpoint), "stage_dir": str(stop.run_dir),
                      "at": time.strftime("%Y-%m-%d %H:%M:%S")}
            for folder in {Path(stop.run_dir), top}:
                (folder / "preempted.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
        raise


def _run_stage(stage: PipelineStage, run_dir: Path, resume: bool) -> StageResult:
    """One stage's run in its prepared directory (its starting model benchmarked first, when asked). A new
    run that fails on user input before its first checkpoint leaves nothing worth keeping: its directory is
    removed, so the corrected command runs as it is. A run that diverged (non-finite loss) keeps it: its
    metrics show how it got there."""
    plan = stage.plan
    try:
        _benchmarks_before(stage, run_dir)
        return plan.stage.run(plan, run_dir, resume)
    except BaseException as error:
        restored = restore_set_aside() if process.is_main() else []
        for folder in restored:
            print(f"posttrain: the new run failed before its data passed its checks; the earlier run in {folder} is "
                  "kept as it was", file=sys.stderr, flush=True)
        if restored or not isinstance(error, UserError):
            raise
        # a new run that fails on user input before its first checkpoint: nothing worth keeping, unless the
        # message points at a file in it (a round's samples)
        points_inside = str(run_dir) in str(error)
        if not resume and process.is_main() and not any(run_dir.glob("checkpoint-*")) and not error.keep_run_dir \
                and not points_inside:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        _forget_engine()


def _forget_engine() -> None:
    """A stage's TRL config under DeepSpeed ZeRO-3 makes transformers build every later model already sharded
    (a process-wide setting). After the stage, models loaded outside a trainer (a merged export, the next
    stage's samplers and scorers) are whole again; the next trainer's config sets it anew."""
    if "transformers" in sys.modules:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def _stage_summary(stage: PipelineStage, stage_dir: Path, summary: dict, output: Path, seconds: float | None) -> dict:
    return {
        "name": stage.name, "stage": stage.recipe.stage, "dir": stage.dir_name, "output": str(output),
        "global_step": summary.get("global_step"), "seconds": seconds,
        "before": summary.get("before"), "after": summary.get("after"),
        **({"data_transforms": summary["data_transforms"]} if summary.get("data_transforms") else {}),
        **({"lm_eval": summary["lm_eval"]} if summary.get("lm_eval") else {}),
        **{k: summary[k] for k in stage.stage.pipeline_keys if k in summary},
    }


def _benchmark(recipe: Recipe, model: str, path: Path) -> dict:
    """lm-eval's record for ``model`` as the recipe's eval.lm_eval asks, kept in ``path`` (reused when there).
    lm-eval runs in the main process; the others wait for its record (or its error)."""
    return process.on_main(_benchmark_here, recipe, model, path)


def _benchmark_here(recipe: Recipe, model: str, path: Path) -> dict:
    from . import benchmarks

    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    options = recipe.eval.lm_eval
    record = benchmarks.evaluate(benchmarks.target_of(model), options.tasks, limit=options.limit,
                                 include_path=options.include_path, num_fewshot=options.num_fewshot,
                                 batch_size=options.batch_size, apply_chat_template=options.apply_chat_template,
                                 dtype=recipe.model.dtype, seed=recipe.seed)
    path.write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(f"posttrain: benchmarks of {record['model']}:\n{benchmarks.table(record)}", flush=True)
    return record


def _benchmarks_before(stage: PipelineStage, stage_dir: Path) -> None:
    recipe = stage.recipe
    if recipe.eval.lm_eval is not None and recipe.eval.before and stage.index == 0:
        _benchmark(recipe, recipe.model.name_or_path, stage_dir / BEFORE_FILE)


def _benchmarks_after(stage: PipelineStage, stage_dir: Path, result: StageResult, output: Path) -> None:
    """The stage's output benchmarked (its eval.json), and both records in its summary.json."""
    recipe = stage.recipe
    if recipe.eval.lm_eval is None:
        return
    model = str(output) if output.is_dir() and (output / "config.json").is_file() else str(stage_dir)
    records = {"after": _benchmark(recipe, model, stage_dir / AFTER_FILE)}
    if (stage_dir / BEFORE_FILE).is_file():
        records = {"before": json.loads((stage_dir / BEFORE_FILE).read_text(encoding="utf-8")), **records}
    result.summary["lm_eval"] = records
    if process.is_main() and (stage_dir / "summary.json").is_file():
        (stage_dir / "summary.json").write_text(json.dumps(result.summary, indent=2, default=str), encoding="utf-8")


def run_pipeline(pipeline: Pipeline, top: Path, *, resume: bool = False, overwrite: bool = False,
                 start_from: str | None = None) -> tuple[Path, dict]:
    """Run a loaded recipe in ``top`` (:meth:`Pipeline.folder`): a one-stage recipe in its own run directory,
    a pipeline's stages in order, each in a run directory of its own inside ``top``."""
    stage_refs.clear()
    process.check_fsdp_device(process.fsdp_requested([s.plan.trl_config for s in pipeline.stages]))
    process.setup_distributed(deepspeed=any(s.plan.trl_config.get("deepspeed") for s in pipeline.stages))
    if pipeline.single:
        summary = _run_one_stage(pipeline.stages[0], top, resume=resume, overwrite=overwrite, start_from=start_from)
    else:
        summary = _run_stages(pipeline, top, resume=resume, overwrite=overwrite, start_from=start_from)
    process.close_process_group()
    return top, summary


def _run_one_stage(stage: PipelineStage, top: Path, *, resume: bool, overwrite: bool, start_from: str | None) -> dict:
    """A one-stage recipe: the run directory is the stage's, its summary the recipe's."""
    if start_from:
        raise UserError("--from restarts a pipeline at a stage, and this recipe has no stages", field="--from",
                        fix="use --resume to continue a one-stage run")
    # rank 0 prepares the run directory; under a distributed launch every rank gets its verdict
    process.on_main(prepare_run_dir, stage.plan, top, resume=resume, overwrite=overwrite)
    result = _run_stage(stage, top, resume)
    _benchmarks_after(stage, top, result, stage.stage.output(top, stage.recipe))
    return result.summary


def _run_stages(pipeline: Pipeline, top: Path, *, resume: bool, overwrite: bool, start_from: str | None) -> dict:
    """A pipeline: each stage in ``top/<nn>-<name>``, a finished one skipped (its output reused), a LoRA stage's
    adapter merged for the stages after it; the pipeline's summary once all have finished."""
    main = process.is_main()
    process.on_main(prepare_pipeline_dir, pipeline, top, resume=resume, overwrite=overwrite, start_from=start_from)
    stages_summary = []
    started = time.time()
    for stage in pipeline.stages:
        kind, plan, stage_dir = stage.stage, stage.plan, top / stage.dir_name
        if kind.finished(stage_dir, stage.recipe):
            print(f"posttrain: stage {stage.dir_name} finished earlier; its output is reused", flush=True)
            summary = json.loads((stage_dir / "summary.json").read_text())
            timing = json.loads((stage_dir / "timing.json").read_text()) if (stage_dir / "timing.json").exists() else {}
            output = kind.output(stage_dir, stage.recipe)
            stage_refs.publish(stage.name, output, kind.dataset(stage_dir))
            stages_summary.append(_stage_summary(stage, stage_dir, summary, output, timing.get("seconds")))
            continue
        print(f"posttrain: stage {stage.dir_name} ({stage.recipe.stage})", flush=True)
        t0 = time.time()
        if (stage_dir / "summary.json").exists():  # trained, but stopped before its merged output was written
            result = StageResult(json.loads((stage_dir / "summary.json").read_text()), model=None)
        else:
            continuing = process.on_main(prepare_stage_dir, plan, stage_dir)
            try:
                result = _run_stage(stage, stage_dir, continuing)
            except UserError as e:
                raise prefixed(e, f"stages[{stage.index}]") from None
        if stage.recipe.model.lora is not None and kind.trains:
            from .trainers.merge import export_merged

            process.on_main(export_merged, plan, stage_dir, pipeline.merged_dtype)
        process.barrier()  # under a distributed launch, the other ranks wait for rank 0's merged output
        seconds = round(time.time() - t0, 1)
        if main:
            (stage_dir / "timing.json").write_text(json.dumps({"seconds": seconds}))
        output = result.model or kind.output(stage_dir, stage.recipe)
        _benchmarks_after(stage, stage_dir, result, output)
        stage_refs.publish(stage.name, output, result.dataset or kind.dataset(stage_dir))
        stages_summary.append(_stage_summary(stage, stage_dir, result.summary, output, seconds))
    summary = {"pipeline": pipeline.name, "stages": stages_summary,
               "seconds_this_session": round(time.time() - started, 1)}
    if main:
        (top / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


__all__ = ["run", "run_pipeline"]
