"""Running a recipe: validate, prepare the run directory, then hand over to the stage.

Every check that can fail on user input happens before the run directory is touched and
before torch is imported, so a bad recipe never costs a model load or an earlier run's files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from .errors import UserError
from .recipe import Recipe, from_data, load_recipe_data
from .stages.pipeline import is_pipeline, parse_pipeline, run_pipeline, validate_pipeline
from .validate import Plan, validate


def run_dir_for(plan: Plan, output_dir: str | None) -> Path:
    return Path(output_dir or plan.recipe.output_dir or Path("runs") / plan.recipe.name)


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def prepare_run_dir(plan: Plan, run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    resolved = plan.recipe.to_dict()
    recipe_file = run_dir / "recipe.yaml"
    if resume:
        if overwrite:
            raise UserError("--resume and --overwrite contradict each other", field="--resume",
                            fix="use --resume to continue the run, or --overwrite to start it again")
        if not recipe_file.is_file():
            raise UserError(f"there is no run to resume in '{run_dir}'", field="--resume",
                            fix="drop --resume to start a new run, or point --output-dir at an earlier run")
        if (run_dir / "summary.json").exists():
            raise UserError(f"the run in '{run_dir}' already finished", field="--resume",
                            fix="start a new run with another --output-dir")
        saved = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
        changes = _diff(saved, resolved)
        if changes:
            raise UserError("the recipe differs from the one the run started with: " + "; ".join(changes[:5]),
                            field="--resume", fix="resume with the same recipe and --set values")
        return
    new_run_dir(run_dir, resolved, overwrite)


def new_run_dir(run_dir: Path, recipe_data: dict, overwrite: bool) -> None:
    """A new run directory holding the resolved recipe; an existing non-empty one only with --overwrite."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"run directory '{run_dir}' already exists", field="--output-dir",
                            fix="choose another --output-dir, continue it with --resume, or replace it with --overwrite")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_data, sort_keys=False), encoding="utf-8")


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed launch (torchrun, accelerate, deepspeed)."""
    return int(os.environ.get("RANK", "0")) == 0


def run(recipe_path: str, overrides: list[str], output_dir: str | None = None, *, removals: list[str] = (),
        resume: bool = False, overwrite: bool = False, start_from: str | None = None) -> tuple[Path, dict]:
    """Run a one-stage recipe or a pipeline; returns the run directory and its summary."""
    data = load_recipe_data(recipe_path, overrides, removals)
    if is_pipeline(data):
        pipeline = validate_pipeline(parse_pipeline(data))
        return run_pipeline(pipeline, output_dir, resume=resume, overwrite=overwrite, start_from=start_from,
                            main=is_main_process())
    if start_from:
        raise UserError("--from restarts a pipeline at a stage, and this recipe has no stages", field="--from",
                        fix="use --resume to continue a one-stage run")
    plan = validate(from_data(Recipe, data, ""))
    run_dir = run_dir_for(plan, output_dir)
    if is_main_process():  # the other ranks of a distributed launch leave the run directory to rank 0
        prepare_run_dir(plan, run_dir, resume=resume, overwrite=overwrite)
    from .stages.loop import run_stage  # heavy: torch, transformers, trl

    try:
        return run_dir, run_stage(plan, run_dir, resume)
    except UserError as error:
        # A run that failed on user input before its first checkpoint leaves nothing worth keeping:
        # remove the directory it created, so the corrected command can be run as it is. A run that
        # diverged (non-finite loss) keeps it: its metrics show how it got there.
        if not resume and is_main_process() and not any(run_dir.glob("checkpoint-*")) and not error.keep_run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
