"""Loading a recipe and running it: every recipe is a pipeline of one or more stages.

A one-stage recipe has the stage's keys at the top (``stage``, ``model``, ``data``, ``plugins``,
``training``, ``eval``, and the stage's own keys such as the iterative stage's ``rounds``); its run
directory is the stage's. A pipeline recipe has a ``stages:`` list instead, ``model`` once at the top
(each stage may add a partial ``model:`` of its own), and each stage starts from the output of the
stage before it unless its ``model.name_or_path`` names another. Wherever a model path or a data source
goes, ``stages.NAME`` stands for an earlier stage's output (:mod:`posttrain.stage_refs`).

:func:`load` reads a recipe file (safe YAML, ``--set``/``--unset``), looks each stage up, parses its
options and validates it once, before anything heavy is imported. :func:`run` owns the run
directories: a new one (refused over an existing one unless ``--overwrite``), ``--resume`` (the same
recipe, from the last checkpoint), ``--from STAGE`` (a pipeline from that stage on), the summaries, the
merged LoRA outputs a pipeline's later stages start from. The stages themselves run through their
``Stage.run``, which imports their trainers.

A pipeline's run directory holds one ordinary run directory per stage, ``<nn>-<name>/``, the pipeline's
``recipe.yaml`` and, once every stage has finished, ``summary.json``. A stage's output is its ``final/``
model (full fine-tuning) or, with LoRA, ``merged/``: the adapter merged into the weights it was trained
on (a 4-bit base is dequantised first), saved once in ``merged_dtype``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import process, stage_refs
from .checkpoints import replaceable, restore_set_aside, set_aside
from .errors import Problems, UserError, UserErrors, did_you_mean
from .recipe import Recipe, from_data, load_recipe_data
from .stage import Stage, StageResult
from .stages import STAGES, get_stage, owner_of_key
from .validate import Plan, validate

COMMON_STAGE_KEYS = ("name", "stage", "description", "model", "data", "plugins", "training", "eval", "seed")
PIPELINE_KEYS = ("name", "description", "model", "stages", "seed", "output_dir", "merged_dtype")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def is_pipeline(data: dict) -> bool:
    return isinstance(data, dict) and "stages" in data


# -- loading ---------------------------------------------------------------------------------------


def recipe_from_data(data: dict, where: str = "") -> Recipe:
    """One stage's recipe from its data: the stage looked up, its plugins defaulted, its own keys parsed
    as its ``Options``, the rest as the common recipe schema. Errors name ``where.KEY``."""
    prefix = f"{where}." if where else ""
    data = dict(data)
    stage = get_stage(data.get("stage", "preference"), f"{prefix}stage")
    if "plugins" not in data:
        data["plugins"] = copy.deepcopy(stage.default_plugins)
    own = {key: data.pop(key) for key in stage.option_keys() if key in data}
    common = {f.name for f in dataclasses.fields(Recipe) if not f.metadata.get("internal")}
    for key in data:
        owners = [o for o in owner_of_key(key) if o != stage.name]
        if key not in common and owners:
            raise UserError(f"'{key}' is a key of the {' and '.join(owners)} stage{'s' if len(owners) > 1 else ''}, "
                            f"not of {stage.name}", field=f"{prefix}{key}",
                            fix=f"remove {key}, or use stage: {owners[0]}")
    recipe = from_data(Recipe, data, where)
    recipe.kind = stage
    recipe.stage_options = stage.parse_options(own, where)
    return recipe


@dataclass
class PipelineStage:
    index: int
    name: str
    data: dict  # the stage as a one-stage recipe, with stages.NAME references left in place
    recipe: Recipe
    plan: Plan | None = None  # once validated

    @property
    def stage(self) -> Stage:
        return self.recipe.kind

    @property
    def dir_name(self) -> str:
        return f"{self.index + 1:02d}-{self.name}"


@dataclass
class Pipeline:
    name: str
    data: dict  # the whole recipe (as written, after --set / --unset)
    stages: list[PipelineStage]
    output_dir: str | None
    merged_dtype: str
    single: bool = False  # a one-stage recipe: the stage's run directory is the recipe's own

    @property
    def plans(self) -> list[Plan]:
        return [s.plan for s in self.stages]

    def stage(self, name: str) -> PipelineStage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise UserError(f"the pipeline has no stage '{name}'{did_you_mean(name, [s.name for s in self.stages])}",
                        field="--from", fix=f"stages: {', '.join(s.name for s in self.stages)}")


def _prefixed(error: UserError, prefix: str) -> UserError:
    """The same error with its field placed inside ``prefix`` (``stages[1].`` + ``plugins.dpo.beta``)."""
    if isinstance(error, UserErrors):
        return UserErrors([_prefixed(e, prefix) for e in error.errors])
    field_ = error.field
    if field_ and not field_.startswith(("--", "stages[")) and field_ != "recipe":
        field_ = f"{prefix}.{field_}"
    elif not field_:
        field_ = prefix
    out = UserError(error.message, field=field_, fix=error.fix)
    out.keep_run_dir = error.keep_run_dir
    out.__cause__ = error
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse(data: dict) -> Pipeline:
    """A recipe's shape, each stage looked up and schema-checked (not yet validated)."""
    if not is_pipeline(data):
        recipe = recipe_from_data(data, "")
        name = recipe.name or "recipe"
        return Pipeline(name, data, [PipelineStage(0, name, data, recipe)], recipe.output_dir, "float32", single=True)
    for key in data:
        if key not in PIPELINE_KEYS:
            stage_key = key in COMMON_STAGE_KEYS or bool(owner_of_key(key))
            hint = " (a pipeline sets it per stage)" if stage_key else did_you_mean(key, PIPELINE_KEYS)
            raise UserError(f"unknown key '{key}' in a pipeline recipe{hint}", field=key,
                            fix=f"pipeline keys: {', '.join(PIPELINE_KEYS)}; stage keys go under each entry of "
                                f"`stages` ({', '.join(COMMON_STAGE_KEYS)}, and a stage's own keys)")
    if "model" not in data or not isinstance(data["model"], dict):
        raise UserError("a pipeline needs a `model` section (the model the first stage starts from)", field="model",
                        fix="add `model: {name_or_path: ...}` at the top of the recipe")
    raw_stages = data["stages"]
    if not isinstance(raw_stages, list) or not raw_stages:
        raise UserError("`stages` must be a non-empty list of stages", field="stages",
                        fix="write `stages:` followed by `- name: sft` / `stage: sft` / `data: ...` entries")
    merged_dtype = data.get("merged_dtype", "float32")
    if merged_dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"expected float32, bfloat16 or float16, got {merged_dtype!r}", field="merged_dtype",
                        fix="use float32 (keeps every LoRA update) or bfloat16 (half the disk)")
    names: list[str] = []
    for i, raw in enumerate(raw_stages):
        where = f"stages[{i}]"
        if not isinstance(raw, dict):
            raise UserError(f"expected a mapping, got {type(raw).__name__}", field=where,
                            fix="each stage is a mapping with name, stage, data, ...")
        for key in ("name", "stage", "data"):
            if key not in raw:
                raise UserError("this key is required", field=f"{where}.{key}", fix=f"add `{key}:` to the stage")
        kind = get_stage(raw["stage"], f"{where}.stage")
        allowed = (*COMMON_STAGE_KEYS, *kind.option_keys())
        for key in raw:
            if key not in allowed:
                owners = owner_of_key(key)
                hint = (f" (a key of the {' and '.join(owners)} stage, not of {kind.name})" if owners else
                        did_you_mean(key, allowed))
                raise UserError(f"unknown key '{key}'{hint}", field=f"{where}.{key}",
                                fix=f"stage keys: {', '.join(allowed)}")
        name = raw["name"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise UserError(f"stage names are lowercase letters, digits, '-' and '_', got {name!r}",
                            field=f"{where}.name", fix="rename the stage, e.g. `name: sft`")
        if name in names:
            raise UserError(f"two stages are named '{name}'", field=f"{where}.name", fix="give each stage its own name")
        names.append(name)
    pipeline_name = data.get("name") or "pipeline"
    stages = []
    for i, raw in enumerate(raw_stages):
        model = _merge(data["model"], raw.get("model") or {})
        if i > 0 and "name_or_path" not in (raw.get("model") or {}):
            model["name_or_path"] = stage_refs.STAGE_REF + names[i - 1]  # the previous stage's output
        stage_data = {
            "name": f"{pipeline_name}-{raw['name']}",
            "description": raw.get("description", ""),
            "stage": raw["stage"],
            "seed": raw.get("seed", data.get("seed", 42)),
            "model": model,
            "data": raw["data"],
            **({"plugins": copy.deepcopy(raw["plugins"])} if "plugins" in raw else {}),
            "training": raw.get("training") or {},
            "eval": raw.get("eval") or {},
            **{key: raw[key] for key in get_stage(raw["stage"]).option_keys() if key in raw},
        }
        recipe = recipe_from_data(stage_data, f"stages[{i}]")
        stages.append(PipelineStage(i, raw["name"], stage_data, recipe))
    return Pipeline(pipeline_name, data, stages, data.get("output_dir"), merged_dtype)


def validate_pipeline(pipeline: Pipeline) -> Pipeline:
    """Validate every stage once, before anything loads; a pipeline's errors name the stage
    (``stages[1].plugins...``)."""
    names = [s.name for s in pipeline.stages]
    problems = Problems()  # every stage is checked; their problems are reported together
    for stage in pipeline.stages:
        if pipeline.single:
            stage.plan = validate(stage.recipe)
            continue
        try:
            stage.plan = validate(stage.recipe, earlier_stages=names[:stage.index], later_stages=names[stage.index:])
        except UserError as e:
            problems.errors.append(_prefixed(e, f"stages[{stage.index}]"))
    problems.raise_any()
    return pipeline


def load(path: str | Path, overrides: list[str] = (), removals: list[str] = ()) -> Pipeline:
    """Read a recipe file, apply ``--set``/``--unset``, and validate every stage."""
    return validate_pipeline(parse(load_recipe_data(path, overrides, removals)))


def load_recipe(path: str | Path, overrides: list[str] = (), removals: list[str] = ()) -> Recipe:
    """A one-stage recipe read and schema-checked (deeper checks: :func:`posttrain.validate.validate`)."""
    data = load_recipe_data(path, overrides, removals)
    if is_pipeline(data):
        raise UserError("this recipe is a pipeline (it has `stages:`)", field="stages",
                        fix="load it with posttrain.runner.load")
    return recipe_from_data(data, "")


# -- run directories -------------------------------------------------------------------------------


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


# -- running ---------------------------------------------------------------------------------------


def run(recipe_path: str, overrides: list[str], output_dir: str | None = None, *, removals: list[str] = (),
        resume: bool = False, overwrite: bool = False, start_from: str | None = None) -> tuple[Path, dict]:
    """Load, validate and run a recipe; returns the run directory and its summary. A run stopped by a signal
    raises :class:`posttrain.process.Preempted` after its checkpoint is saved, and leaves ``preempted.json``
    in the run directory (and the pipeline's)."""
    pipeline = load(recipe_path, overrides, removals)
    top = Path(output_dir or pipeline.output_dir or Path("runs") / pipeline.name)
    try:
        return run_pipeline(pipeline, output_dir, resume=resume, overwrite=overwrite, start_from=start_from)
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


BEFORE_FILE = "eval_before_benchmarks.json"  # lm-eval's results for the model a run starts from
AFTER_FILE = "eval.json"  # lm-eval's results for the stage's output (what `posttrain eval RUN_DIR` writes too)


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


def _prepare_stage_dir(plan: Plan, stage_dir: Path) -> bool:
    """A pipeline stage's run directory: the one an earlier session started (resumed), or a new one. Returns
    whether it continues an earlier session."""
    continuing = (stage_dir / "recipe.yaml").is_file()
    prepare_run_dir(plan, stage_dir, resume=continuing, overwrite=False)
    return continuing


def run_pipeline(pipeline: Pipeline, output_dir: str | None, *, resume: bool = False, overwrite: bool = False,
                 start_from: str | None = None) -> tuple[Path, dict]:
    """Run the stages in order; a pipeline's finished stages (summary and output present) are skipped."""
    main = process.is_main()
    top = Path(output_dir or pipeline.output_dir or Path("runs") / pipeline.name)
    stage_refs.clear()
    process.check_fsdp_device(process.fsdp_requested([s.plan.trl_config for s in pipeline.stages]))
    process.setup_distributed(deepspeed=any(s.plan.trl_config.get("deepspeed") for s in pipeline.stages))
    if pipeline.single:
        if start_from:
            raise UserError("--from restarts a pipeline at a stage, and this recipe has no stages", field="--from",
                            fix="use --resume to continue a one-stage run")
        stage = pipeline.stages[0]
        plan = stage.plan
        # rank 0 prepares the run directory; under a distributed launch every rank gets its verdict
        process.on_main(prepare_run_dir, plan, top, resume=resume, overwrite=overwrite)
        result = _run_stage(stage, top, resume)
        _benchmarks_after(stage, top, result, stage.stage.output(top, stage.recipe))
        process.close_process_group()
        return top, result.summary
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
            continuing = process.on_main(_prepare_stage_dir, plan, stage_dir)
            try:
                result = _run_stage(stage, stage_dir, continuing)
            except UserError as e:
                raise _prefixed(e, f"stages[{stage.index}]") from None
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
    process.close_process_group()
    return top, summary


__all__ = ["Pipeline", "PipelineStage", "STAGES", "is_pipeline", "load", "load_recipe", "parse", "recipe_from_data",
           "run", "run_pipeline", "validate_pipeline"]
