"""A recipe as a pipeline of stages, loaded and validated before anything heavy is imported.

Every recipe is a pipeline of one or more stages. A one-stage recipe has the stage's keys at the top
(``stage``, ``model``, ``data``, ``plugins``, ``training``, ``eval``, and the stage's own keys such as the
iterative stage's ``rounds``); its run directory is the stage's. A pipeline recipe has a ``stages:`` list
instead, ``model`` once at the top (each stage may add a partial ``model:`` of its own), and each stage
starts from the output of the stage before it unless its ``model.name_or_path`` names another. Wherever a
model path or a data source goes, ``stages.NAME`` stands for an earlier stage's output
(:mod:`posttrain.stage_refs`).

:func:`load` reads a recipe file (safe YAML, ``--set``/``--unset``), looks each stage up, parses its options
and validates it once, reporting every problem it finds (:class:`posttrain.errors.UserErrors`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from . import stage_refs
from .errors import Problems, UserError, UserErrors, did_you_mean
from .recipe import Recipe, from_data, load_recipe_data
from .stage import Stage
from .stages import get_stage, owner_of_key
from .validate import Plan, validate


COMMON_STAGE_KEYS = ("name", "stage", "description", "model", "data", "plugins", "training", "eval", "seed")


PIPELINE_KEYS = ("name", "description", "model", "stages", "seed", "output_dir", "merged_dtype")


_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def is_pipeline(data: dict) -> bool:
    return isinstance(data, dict) and "stages" in data


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

    def folder(self, output_dir: str | None = None) -> Path:
        """The recipe's run directory: ``--output-dir``, else the recipe's ``output_dir``, else runs/NAME."""
        return Path(output_dir or self.output_dir or Path("runs") / self.name)

    def stage(self, name: str) -> PipelineStage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise UserError(f"the pipeline has no stage '{name}'{did_you_mean(name, [s.name for s in self.stages])}",
                        field="--from", fix=f"stages: {', '.join(s.name for s in self.stages)}")


def prefixed(error: UserError, prefix: str) -> UserError:
    """The same error with its field placed inside ``prefix`` (``stages[1].`` + ``plugins.dpo.beta``)."""
    if isinstance(error, UserErrors):
        return UserErrors([prefixed(e, prefix) for e in error.errors])
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
            problems.errors.append(prefixed(e, f"stages[{stage.index}]"))
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
