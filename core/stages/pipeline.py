"""Pipelines: several stages in one recipe, each starting from the previous stage's output.

A pipeline recipe has a ``stages:`` list instead of a stage's ``stage``/``data``/``plugins``/
``training``/``eval`` keys. ``model`` is set once at the top; each stage may add a partial
``model:`` section of its own (another LoRA rank, ``name_or_path: stages.sft``...). A stage starts
from the output of the stage before it unless its ``model.name_or_path`` names another. Wherever a
model path is accepted (``model.name_or_path``, ``model.reference``, a plugin option such as
``reward_model``'s ``model``) ``stages.NAME`` stands for an earlier stage's output.

The run directory holds one ordinary run directory per stage, ``<nn>-<name>/``, the pipeline's
``recipe.yaml`` and, once every stage has finished, ``summary.json``. A stage's output is its
``final/`` model (full fine-tuning) or, with LoRA, ``merged/``: the adapter merged into the
weights it was trained on (a 4-bit base is dequantised first), saved once in ``merged_dtype``.

This module is light (no torch at import): parsing and validation run before anything loads; the
run imports the heavy parts when it starts.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError, did_you_mean
from ..recipe import DEFAULT_PLUGINS, Recipe, from_data
from ..validate import STAGE_REF, Plan, validate
from . import STAGES

STAGE_KEYS = ("name", "stage", "description", "model", "data", "plugins", "training", "eval", "seed", "rounds",
              "sampling")
PIPELINE_KEYS = ("name", "description", "model", "stages", "seed", "output_dir", "merged_dtype")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def is_pipeline(data: dict) -> bool:
    return isinstance(data, dict) and "stages" in data


@dataclass
class PipelineStage:
    index: int
    name: str
    data: dict  # the stage as a one-stage recipe, with stages.NAME references left in place
    recipe: Recipe

    @property
    def dir_name(self) -> str:
        return f"{self.index + 1:02d}-{self.name}"


@dataclass
class Pipeline:
    name: str
    data: dict  # the whole pipeline recipe (as written, after --set / --unset and defaults)
    stages: list[PipelineStage]
    output_dir: str | None
    merged_dtype: str
    plans: list[Plan] = field(default_factory=list)

    def stage(self, name: str) -> PipelineStage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise UserError(f"the pipeline has no stage '{name}'{did_you_mean(name, [s.name for s in self.stages])}",
                        field="--from", fix=f"stages: {', '.join(s.name for s in self.stages)}")


def _prefixed(error: UserError, prefix: str) -> UserError:
    """The same error with its field placed inside ``prefix`` (``stages[1].`` + ``plugins.dpo.beta``)."""
    field_ = error.field
    if field_ and not field_.startswith(("--", "stages[")) and field_ != "recipe":
        field_ = f"{prefix}.{field_}"
    elif not field_:
        field_ = prefix
    out = UserError(error.message, field=field_, fix=error.fix)
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


def parse_pipeline(data: dict) -> Pipeline:
    """Check a pipeline recipe's shape and build each stage's one-stage recipe (schema-checked)."""
    for key in data:
        if key not in PIPELINE_KEYS:
            hint = (" (a pipeline sets it per stage)" if key in STAGE_KEYS else did_you_mean(key, PIPELINE_KEYS))
            raise UserError(f"unknown key '{key}' in a pipeline recipe{hint}", field=key,
                            fix=f"pipeline keys: {', '.join(PIPELINE_KEYS)}; stage keys go under each entry of "
                                f"`stages` ({', '.join(STAGE_KEYS)})")
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
        for key in raw:
            if key not in STAGE_KEYS:
                raise UserError(f"unknown key '{key}'{did_you_mean(key, STAGE_KEYS)}", field=f"{where}.{key}",
                                fix=f"stage keys: {', '.join(STAGE_KEYS)}")
        for key in ("name", "stage", "data"):
            if key not in raw:
                raise UserError("this key is required", field=f"{where}.{key}", fix=f"add `{key}:` to the stage")
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
            model["name_or_path"] = STAGE_REF + names[i - 1]  # the previous stage's output
        kind = raw["stage"]
        stage_data = {
            "name": f"{pipeline_name}-{raw['name']}",
            "description": raw.get("description", ""),
            "stage": kind,
            "seed": raw.get("seed", data.get("seed", 42)),
            "model": model,
            "data": raw["data"],
            "plugins": copy.deepcopy(raw["plugins"]) if "plugins" in raw else copy.deepcopy(
                DEFAULT_PLUGINS.get(kind, {})),
            "training": raw.get("training") or {},
            "eval": raw.get("eval") or {},
            **{key: raw[key] for key in ("rounds", "sampling") if key in raw},
        }
        recipe = from_data(Recipe, stage_data, f"stages[{i}]")
        stages.append(PipelineStage(i, raw["name"], stage_data, recipe))
    return Pipeline(pipeline_name, data, stages, data.get("output_dir"), merged_dtype)


def validate_pipeline(pipeline: Pipeline) -> Pipeline:
    """Validate every stage before anything loads; errors name the stage (``stages[1].plugins...``)."""
    names = [s.name for s in pipeline.stages]
    pipeline.plans = []
    for stage in pipeline.stages:
        try:
            pipeline.plans.append(validate(stage.recipe, earlier_stages=names[:stage.index],
                                           later_stages=names[stage.index:]))
        except UserError as e:
            raise _prefixed(e, f"stages[{stage.index}]") from None
    return pipeline


# -- running ------------------------------------------------------------------------------------


def stage_output(stage_dir: Path, recipe: Recipe) -> Path:
    """Where a stage's model is, for the stages after it: merged/ with LoRA, else final/; a
    rejection_sampling stage trains nothing, so its output is the model it sampled from."""
    if recipe.stage == "rejection_sampling":
        summary = stage_dir / "summary.json"
        return Path(json.loads(summary.read_text())["model"]) if summary.is_file() else stage_dir / "model"
    return stage_dir / ("merged" if recipe.model.lora is not None else "final")


def stage_dataset(stage_dir: Path) -> Path:
    """The dataset a stage wrote for the next ones (rejection_sampling's best samples)."""
    from .rejection_sampling import DATASET_FILE

    return stage_dir / DATASET_FILE


def _finished(stage_dir: Path, recipe: Recipe) -> bool:
    if not (stage_dir / "summary.json").is_file():
        return False
    if recipe.stage == "rejection_sampling":
        return stage_dataset(stage_dir).is_file()
    return (stage_output(stage_dir, recipe) / "config.json").is_file()


def _resolve_references(data: dict, outputs: dict[str, Path], dirs: dict[str, Path]) -> dict:
    """The stage's recipe data with every ``stages.NAME`` replaced by that stage's output folder, or,
    as a data source, by the dataset that stage wrote."""
    def walk(value, path):
        if isinstance(value, str) and value.startswith(STAGE_REF):
            name = value[len(STAGE_REF):]
            if path in ("data.source", "data.eval.source"):
                return str(stage_dataset(dirs[name]).resolve())
            return str(outputs[name].resolve())
        if isinstance(value, dict):
            return {k: walk(v, f"{path}.{k}" if path else k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, path) for v in value]
        return value

    return walk(copy.deepcopy(data), "")


def _changed_stages(saved: dict, current: dict) -> list[str]:
    """Names of the stages whose recipe differs (and '(pipeline)' when the top-level keys differ)."""
    out = []
    top = {k: v for k, v in saved.items() if k != "stages"} != {k: v for k, v in current.items() if k != "stages"}
    if top:
        out.append("(pipeline)")
    old = {s.get("name"): s for s in saved.get("stages", [])}
    for s in current.get("stages", []):
        if old.get(s.get("name")) != s:
            out.append(s.get("name"))
    if [s.get("name") for s in saved.get("stages", [])] != [s.get("name") for s in current.get("stages", [])]:
        out.append("(the list of stages)")
    return out


def prepare_pipeline_dir(pipeline: Pipeline, top: Path, *, resume: bool, overwrite: bool,
                         start_from: str | None) -> None:
    recipe_file = top / "recipe.yaml"
    if resume or start_from:
        if overwrite:
            raise UserError("--overwrite contradicts --resume/--from", field="--overwrite",
                            fix="use --resume or --from to continue the pipeline, or --overwrite to start it again")
        if not recipe_file.is_file():
            raise UserError(f"there is no pipeline to continue in '{top}'", field="--from" if start_from else "--resume",
                            fix="drop --resume/--from to start a new run, or point --output-dir at an earlier run")
        saved = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
        changed = _changed_stages(saved, pipeline.data)
        if start_from:
            first = pipeline.stage(start_from).index
            earlier = {s.name for s in pipeline.stages[:first]}
            bad = [c for c in changed if c in earlier or c.startswith("(")]
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
            if changed:
                raise UserError(f"the recipe differs from the one the pipeline started with (stages: "
                                f"{', '.join(changed)})", field="--resume",
                                fix="resume with the same recipe, or restart from the first changed stage with "
                                    "--from NAME")
        recipe_file.write_text(yaml.safe_dump(pipeline.data, sort_keys=False), encoding="utf-8")
        return
    from ..run import new_run_dir

    new_run_dir(top, pipeline.data, overwrite)


def _stage_summary(stage: PipelineStage, stage_dir: Path, summary: dict, seconds: float | None) -> dict:
    return {
        "name": stage.name, "stage": stage.recipe.stage, "dir": stage.dir_name,
        "output": str(stage_output(stage_dir, stage.recipe)),
        "global_step": summary.get("global_step"), "seconds": seconds,
        "before": summary.get("before"), "after": summary.get("after"),
        **({"reward_stats": summary["reward_stats"]} if "reward_stats" in summary else {}),
        **({"data_transforms": summary["data_transforms"]} if summary.get("data_transforms") else {}),
        **({k: summary[k] for k in ("reward_first_third", "reward_last_third", "rounds",  # online, iterative
                                    "kept", "best_rewards") if k in summary}),  # rejection sampling
    }


def run_pipeline(pipeline: Pipeline, output_dir: str | None, *, resume: bool = False, overwrite: bool = False,
                 start_from: str | None = None, main: bool = True) -> tuple[Path, dict]:
    """Run the stages in order; finished stages (summary and output present) are skipped."""
    from ..run import prepare_run_dir

    top = Path(output_dir or pipeline.output_dir or Path("runs") / pipeline.name)
    if main:
        prepare_pipeline_dir(pipeline, top, resume=resume, overwrite=overwrite, start_from=start_from)
    outputs: dict[str, Path] = {}
    stages_summary = []
    started = time.time()
    for stage in pipeline.stages:
        stage_dir = top / stage.dir_name
        if _finished(stage_dir, stage.recipe):
            print(f"posttrain: stage {stage.dir_name} finished earlier; its output is reused", flush=True)
            summary = json.loads((stage_dir / "summary.json").read_text())
            timing = json.loads((stage_dir / "timing.json").read_text()) if (stage_dir / "timing.json").exists() else {}
            stages_summary.append(_stage_summary(stage, stage_dir, summary, timing.get("seconds")))
            outputs[stage.name] = stage_output(stage_dir, stage.recipe)
            continue
        print(f"posttrain: stage {stage.dir_name} ({stage.recipe.stage})", flush=True)
        resolved = _resolve_references(stage.data, outputs, {s.name: top / s.dir_name for s in pipeline.stages})
        try:
            plan = validate(from_data(Recipe, resolved, f"stages[{stage.index}]"), earlier_stages=[])
        except UserError as e:
            raise _prefixed(e, f"stages[{stage.index}]") from None
        continuing = (stage_dir / "recipe.yaml").is_file() and not (stage_dir / "summary.json").exists()
        t0 = time.time()
        if (stage_dir / "summary.json").exists():  # trained, but stopped before its merged output was written
            summary = json.loads((stage_dir / "summary.json").read_text())
        else:
            if main:
                prepare_run_dir(plan, stage_dir, resume=continuing, overwrite=False)
            from .loop import run_stage

            try:
                summary = run_stage(plan, stage_dir, continuing, end_distributed=False)
            except UserError as e:
                raise _prefixed(e, f"stages[{stage.index}]") from None
        if main and stage.recipe.model.lora is not None and STAGES[stage.recipe.stage].trains:
            export_merged(plan, stage_dir, pipeline.merged_dtype)
        _barrier()  # under a distributed launch, the other ranks wait for rank 0's merged output
        seconds = round(time.time() - t0, 1)
        if main:
            (stage_dir / "timing.json").write_text(json.dumps({"seconds": seconds}))
        stages_summary.append(_stage_summary(stage, stage_dir, summary, seconds))
        outputs[stage.name] = stage_output(stage_dir, stage.recipe)
    summary = {"pipeline": pipeline.name, "stages": stages_summary,
               "seconds_this_session": round(time.time() - started, 1)}
    if main:
        (top / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    from .loop import close_process_group

    close_process_group()
    return top, summary


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def export_merged(plan: Plan, stage_dir: Path, dtype: str) -> Path:
    """The LoRA stage's adapter merged into the weights it was trained on, saved to ``merged/`` once.

    The base is loaded as training loaded it; a 4-bit or 8-bit base is dequantised first, so the
    merged weights are the ones the adapter was trained against. Saved in ``dtype`` (float32 by
    default: merging a small LoRA update into bf16 weights rounds it away, as a bf16 optimizer step
    would)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    from ..models import resolve_model_path, torch_dtype

    target = stage_dir / "merged"
    if (target / "config.json").is_file():
        return target
    recipe = plan.recipe
    path = resolve_model_path(recipe.model.name_or_path)
    reward = recipe.stage == "reward_model"
    architecture = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "revision": recipe.model.revision,
                              "trust_remote_code": recipe.model.trust_remote_code}
    if reward:
        kwargs["num_labels"] = 1
    q = recipe.model.quantization
    if q is not None:
        kwargs["quantization_config"] = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                                            bnb_4bit_use_double_quant=q.double_quant,
                                                            bnb_4bit_compute_dtype=torch_dtype(dtype))
                                         if q.bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    if reward:
        from trl.trainer.reward_trainer import suppress_seqcls_warning

        with suppress_seqcls_warning():
            base = architecture.from_pretrained(path, **kwargs)
    else:
        base = architecture.from_pretrained(path, **kwargs)
    if q is not None:
        base = base.dequantize().to(torch_dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(stage_dir / "final")
    if reward:
        base.config.pad_token_id = tokenizer.pad_token_id
    merged = PeftModel.from_pretrained(base, stage_dir / "final").merge_and_unload()
    staging = stage_dir / "merged.partial"
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    for extra in ("reward_stats.json",):
        if (stage_dir / "final" / extra).is_file():
            shutil.copy(stage_dir / "final" / extra, staging / extra)
    staging.rename(target)
    del merged, base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return target

