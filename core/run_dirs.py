"""Run directories: a new one (refused over an existing one unless ``--overwrite``), the one a ``--resume``
continues (the same recipe, or one that only trains longer or observes differently), a pipeline's folder
and ``--from STAGE``.

A pipeline's run directory holds one ordinary run directory per stage, ``<nn>-<name>/``, the pipeline's
``recipe.yaml`` and, once every stage has finished, ``summary.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from . import stage_refs
from .checkpoints import replaceable, set_aside
from .errors import UserError
from .pipeline import Pipeline
from .validate import Plan

BEFORE_FILE = "eval_before_benchmarks.json"  # lm-eval's results for the model a run starts from
AFTER_FILE = "eval.json"  # lm-eval's results for the stage's output (what `posttrain eval RUN_DIR` writes too)


# What a --resume may change. A resume continues the steps already trained; these keys only say how far the
# run goes on (EXTENDING: never below the step its checkpoint reached) or what it saves, logs, evaluates and
# reports on the way (OBSERVING). Any other difference (learning rate, batch sizes, plugins, data, model, seed,
# the scheduler...) would change what was trained, and is refused.
EXTENDING = ("training.max_steps", "training.num_train_epochs")


OBSERVING = ("description", "training.save_steps", "training.save_strategy", "training.save_total_limit",
             "training.logging_steps", "training.logging_strategy", "training.logging_first_step",
             "training.report_to", "training.run_name", "training.eval_steps", "training.eval_strategy",
             "training.eval_delay", "training.eval_on_start", "training.disable_tqdm", "training.log_level",
             "training.push_to_hub", "training.hub_model_id", "training.hub_strategy", "training.hub_private_repo")


RESUME_FIX = ("a resume may change only how long the run trains (training.max_steps, num_train_epochs) and what it "
              "saves, logs and evaluates (see \"Stopping and resuming\" in docs/recipes.md)")


def _changes(a, b, prefix="") -> list[tuple[str, object, object]]:
    """Every leaf that differs between two recipes: (dotted path, old value, new value)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _changes(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def _describe(changes) -> str:
    return "; ".join(f"{path}: {old!r} -> {new!r}" for path, old, new in changes)


def _may_change(path: str, extend: bool) -> bool:
    """Whether a resume may change ``path``: an observing key, or (``extend``) a key that trains it longer."""
    return path in OBSERVING or (extend and path in EXTENDING)


def _length(plan: Plan) -> tuple[int, float]:
    """How long the recipe trains: TRL's max_steps (-1: by epochs) and num_train_epochs, defaults filled in."""
    from . import trl_fields

    defaults = trl_fields.config_defaults(plan.recipe.kind.config) if plan.recipe.kind.trains else {}
    value = lambda key: plan.trl_config.get(key, defaults.get(key))  # noqa: E731
    max_steps, epochs = value("max_steps"), value("num_train_epochs")
    return int(max_steps if max_steps is not None else -1), float(epochs if epochs is not None else 0.0)


def _reached(run_dir: Path) -> tuple[Path | None, int, float]:
    """The newest complete checkpoint of a run folder, with the step and epoch it reached ((None, 0, 0.0) without
    one; incomplete ones are the trainer's to report when it resumes)."""
    from .checkpoints import newest_complete, step_of

    try:
        checkpoint = newest_complete(run_dir, say=lambda _: None)
    except UserError:
        checkpoint = None
    if checkpoint is None:
        return None, 0, 0.0
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    return checkpoint, int(state.get("global_step") or step_of(checkpoint)), float(state.get("epoch") or 0.0)


def _keep_earlier(path: Path, tag: str, *, move: bool = True) -> Path:
    """Keep ``path`` (a recipe, a summary) as ``<stem>.<tag><suffix>``, never over an earlier one: moved aside, or
    (``move=False``) copied, for a file that is replaced next and must never be missing."""
    target = path.with_name(f"{path.stem}.{tag}{path.suffix}")
    n = 2
    while target.exists():
        target = path.with_name(f"{path.stem}.{tag}.{n}{path.suffix}")
        n += 1
    if move:
        path.replace(target)
    else:
        shutil.copy2(path, target)
    return target


def _write_recipe(path: Path, data: dict) -> None:
    """Write a recipe file whole (a new file renamed over the old one)."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    tmp.replace(path)


def new_run_dir(run_dir: Path, recipe_data: dict, overwrite: bool) -> None:
    """A new run directory holding the resolved recipe. An existing non-empty one: a run that failed before it
    had anything worth keeping is replaced (see checkpoints.replaceable); another only with --overwrite, and
    then set aside until the new run's data has passed its checks (put back if it fails before)."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if replaceable(run_dir):
            print(f"posttrain: replacing the run in {run_dir}, which stopped before it had a checkpoint", flush=True)
            shutil.rmtree(run_dir)
        elif not overwrite:
            raise UserError(f"run directory '{run_dir}' already exists", field="--output-dir",
                            fix="choose another --output-dir, continue it with --resume, or replace it with --overwrite")
        else:
            set_aside(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the run folder '{run_dir}': {type(e).__name__}: {e}", field="--output-dir",
                        fix="choose a folder you can write to, with free space") from None
    writable(run_dir)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_data, sort_keys=False), encoding="utf-8")


def prepare_run_dir(plan: Plan, run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """One stage's run directory: a new one, or the one to resume. Its recipe.yaml holds the recipe with every
    key filled in and ``stages.NAME`` resolved to the folder it stood for.

    A resume takes the recipe the run started with, or one that differs only in how long it trains or in what it
    saves, logs and evaluates (EXTENDING, OBSERVING); it never goes below the step its newest checkpoint reached.
    A finished run (summary.json) is resumed only to train it longer, from its newest checkpoint. The recipe the
    run goes on with becomes recipe.yaml; the one it replaces is kept as ``recipe.until-step-N.yaml`` (and a
    finished run's summary.json and eval.json as ``*.until-step-N.json``)."""
    resolved = stage_refs.resolved(plan.recipe.to_dict())
    recipe_file = run_dir / "recipe.yaml"
    if not resume:
        new_run_dir(run_dir, resolved, overwrite)
        return
    if overwrite:
        raise UserError("--resume and --overwrite contradict each other", field="--resume",
                        fix="use --resume to continue the run, or --overwrite to start it again")
    if not recipe_file.is_file():
        raise UserError(f"there is no run to resume in '{run_dir}'", field="--resume",
                        fix="drop --resume to start a new run, or point --output-dir at an earlier run")
    extend = plan.recipe.kind.extendable
    saved = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
    changes = _changes(saved, resolved)
    refused = [c for c in changes if not _may_change(c[0], extend)]
    if refused:
        raise UserError("the recipe differs from the one the run started with: " + _describe(refused[:5]),
                        field="--resume", fix=f"resume with the same recipe and --set values; {RESUME_FIX}")
    checkpoint, step, epoch = _reached(run_dir)
    summary_file = run_dir / "summary.json"
    finished = summary_file.exists()
    if finished:
        try:
            step = max(step, int(json.loads(summary_file.read_text(encoding="utf-8")).get("global_step") or 0))
        except (OSError, ValueError):
            pass
    if extend:
        _check_length(plan, run_dir, checkpoint, step, epoch)
    if finished:
        max_steps, epochs = _length(plan) if extend else (-1, 0.0)
        longer = extend and (max_steps > step if max_steps > 0 else epochs > epoch + 1e-6)
        if not longer:
            more = ("; to train it longer, --resume with a larger training.max_steps (or num_train_epochs)"
                    if extend else "")
            raise UserError(f"the run in '{run_dir}' already finished (step {step})", field="--resume",
                            fix=f"start a new run with another --output-dir{more}")
        if checkpoint is None:
            raise UserError(f"the run in '{run_dir}' finished without a checkpoint to train it on from",
                            field="--resume",
                            fix="start the longer run anew (another --output-dir, or --overwrite); a run meant to be "
                                "extended keeps its last checkpoint (training.save_strategy: steps)")
    writable(run_dir)
    if changes:
        kept = _keep_earlier(recipe_file, f"until-step-{step}", move=False)
        _write_recipe(recipe_file, resolved)
        print(f"posttrain: --resume goes on with {_describe(changes)}; the earlier recipe is kept as {kept.name}",
              flush=True)
    if finished:
        moved = [_keep_earlier(run_dir / name, f"until-step-{step}").name for name in ("summary.json", AFTER_FILE)
                 if (run_dir / name).is_file()]
        print(f"posttrain: training the finished run on from {checkpoint.name}; its results so far are kept as "
              f"{', '.join(moved)}", flush=True)
    (run_dir / "preempted.json").unlink(missing_ok=True)


def _check_length(plan: Plan, run_dir: Path, checkpoint: Path | None, step: int, epoch: float) -> None:
    """A resume never asks for fewer steps (or epochs) than the run already trained."""
    max_steps, epochs = _length(plan)
    where = f"its newest checkpoint is {checkpoint.name}" if checkpoint is not None else "its summary says so"
    if max_steps > 0 and step > max_steps:
        raise UserError(f"training.max_steps is {max_steps}, and the run in '{run_dir}' already trained {step} steps "
                        f"({where})", field="training.max_steps",
                        fix=f"resume with training.max_steps of {step} or more, or start a new run with another "
                            "--output-dir (or --overwrite)")
    if max_steps <= 0 and epoch > epochs + 1e-6:
        raise UserError(f"training.num_train_epochs is {epochs:g}, and the run in '{run_dir}' already trained "
                        f"{epoch:g} epochs ({where})", field="training.num_train_epochs",
                        fix=f"resume with training.num_train_epochs of {epoch:g} or more, or start a new run with "
                            "another --output-dir (or --overwrite)")


def writable(run_dir: Path) -> None:
    """Refuse, before any model loads, a run folder that cannot be written."""
    probe = run_dir / ".posttrain-write-test"
    try:
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write into '{run_dir}': {type(e).__name__}: {e}", field="--output-dir",
                        fix="choose a folder you can write to, with free space") from None


def _changed_stages(saved: dict, current: dict, may_change=lambda stage, path: False) -> list[str]:
    """The stages whose recipe differs in a way ``may_change(stage name, dotted path)`` does not allow, each with
    its first changes ('(pipeline)' when the top-level keys differ, '(the list of stages)' when the stages do)."""
    out = []
    top = [c for c in _changes({k: v for k, v in saved.items() if k != "stages"},
                               {k: v for k, v in current.items() if k != "stages"}) if c[0] not in OBSERVING]
    if top:
        out.append(f"(pipeline) ({_describe(top[:3])})")
    old = {s.get("name"): s for s in saved.get("stages", []) if isinstance(s, dict)}
    for s in current.get("stages", []):
        name = s.get("name")
        if name not in old:
            out.append(f"{name} (a new stage)")
            continue
        refused = [c for c in _changes(old[name], s) if not may_change(name, c[0])]
        if refused:
            out.append(f"{name} ({_describe(refused[:3])})")
    if [s.get("name") for s in saved.get("stages", [])] != [s.get("name") for s in current.get("stages", [])]:
        out.append("(the list of stages)")
    return out


def prepare_pipeline_dir(pipeline: Pipeline, top: Path, *, resume: bool, overwrite: bool,
                         start_from: str | None) -> None:
    """A pipeline's run directory: a new one, or the one to continue (``--resume``, ``--from STAGE``). A resume
    allows the changes a stage's resume allows: what any stage saves, logs and evaluates, and how long a stage
    that has not finished trains (a finished stage's output is what the stages after it started from: restart
    it with ``--from``). ``--from`` allows, in the stages it keeps, only what they save, log and evaluate. The
    recipe the pipeline goes on with becomes recipe.yaml; a different earlier one is kept as
    ``recipe.earlier.yaml``."""
    recipe_file = top / "recipe.yaml"
    if not (resume or start_from):
        new_run_dir(top, pipeline.data, overwrite)
        return
    if overwrite:
        raise UserError("--overwrite contradicts --resume/--from", field="--overwrite",
                        fix="use --resume or --from to continue the pipeline, or --overwrite to start it again")
    if not recipe_file.is_file():
        raise UserError(f"there is no pipeline to continue in '{top}'", field="--from" if start_from else "--resume",
                        fix="drop --resume/--from to start a new run, or point --output-dir at an earlier run")
    writable(top)
    saved = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
    if start_from:
        first = pipeline.stage(start_from).index
        earlier = {s.name for s in pipeline.stages[:first]}
        changed = _changed_stages(saved, pipeline.data, lambda stage, path: path in OBSERVING)
        bad = [c for c in changed if c.split(" ")[0] in earlier or c.startswith("(")]
        if bad:
            raise UserError(f"--from {start_from} keeps the earlier stages' outputs, but the recipe changed "
                            f"for: {', '.join(bad)}", field="--from",
                            fix="change only the stages from the one you restart at, or start a new run")
        for stage in pipeline.stages[first:]:
            shutil.rmtree(top / stage.dir_name, ignore_errors=True)
        (top / "summary.json").unlink(missing_ok=True)
    else:
        if (top / "summary.json").exists():
            raise UserError(f"the pipeline in '{top}' already finished", field="--resume",
                            fix="start a new run with another --output-dir, or restart a stage with --from NAME")
        open_stages = {s.name for s in pipeline.stages
                       if s.stage.extendable and not (top / s.dir_name / "summary.json").exists()}
        changed = _changed_stages(saved, pipeline.data,
                                  lambda stage, path: _may_change(path, stage in open_stages))
        if changed:
            raise UserError(f"the recipe differs from the one the pipeline started with (stages: "
                            f"{', '.join(changed)})", field="--resume",
                            fix="resume with the same recipe, or restart from the first changed stage with "
                                f"--from NAME; {RESUME_FIX}, in a stage that has not finished")
    if _changes(saved, pipeline.data):
        kept = _keep_earlier(recipe_file, "earlier", move=False)
        print(f"posttrain: the pipeline goes on with the changed recipe; the earlier one is kept as {kept.name}",
              flush=True)
    _write_recipe(recipe_file, pipeline.data)
    (top / "preempted.json").unlink(missing_ok=True)


def prepare_stage_dir(plan: Plan, stage_dir: Path) -> bool:
    """A pipeline stage's run directory: the one an earlier session started (resumed), or a new one. Returns
    whether it continues an earlier session."""
    continuing = (stage_dir / "recipe.yaml").is_file()
    prepare_run_dir(plan, stage_dir, resume=continuing, overwrite=False)
    return continuing
