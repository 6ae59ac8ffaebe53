"""The ``posttrain`` command.

Exit status: 0 success, 2 a problem the user can fix (message on stderr naming the field and
the fix, no traceback), 1 an internal error. ``--help``, ``validate``, ``plugins``,
``recipes`` and ``estimate`` never import torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from . import __version__
from .errors import UserError


def recipes_dir() -> Path:
    """The shipped recipes: the package ``posttrain.recipes`` (inside the installed package, or the
    repository's recipes/ folder in a source checkout), or ``POSTTRAIN_RECIPES``."""
    env = os.environ.get("POSTTRAIN_RECIPES")
    if env:
        return Path(env)
    import importlib.util

    spec = importlib.util.find_spec("posttrain.recipes")
    if spec is None or not spec.submodule_search_locations:
        return Path(__file__).resolve().parent.parent / "recipes"
    return Path(list(spec.submodule_search_locations)[0])


def resolve_recipe(arg: str) -> str:
    """A recipe path, or the name of a shipped recipe (``quickstart`` -> recipes/quickstart.yaml)."""
    if Path(arg).exists() or "/" in arg or arg.endswith((".yaml", ".yml")):
        return arg
    shipped = recipes_dir() / f"{arg}.yaml"
    return str(shipped) if shipped.is_file() else arg


def _describe_plan(plan, indent: str = "  ") -> None:
    r = plan.recipe
    print(f"{indent}stage:    {r.stage}")
    lora = f", LoRA r={r.model.lora.r}" if r.model.lora else ", full fine-tuning"
    quant = f", {r.model.quantization.bits}-bit base" if r.model.quantization else ""
    print(f"{indent}model:    {r.model.name_or_path}{lora}{quant}")
    held = r.data.eval.source or r.data.eval.split or f"{r.data.eval.fraction:.0%} of the training data"
    if isinstance(r.data.source, list):
        from .data import training_sources

        print(f"{indent}data:     {len(r.data.source)} sources, concatenated (held out: {held})")
        for src in training_sources(r.data):
            print(f"{indent}  {src.where}: {src.describe()}")
    else:
        print(f"{indent}data:     {r.data.source} (held out: {held})")
    for p in plan.plugins.plugins:
        print(f"{indent}plugin:   {p.name} {vars(p.options) if hasattr(p.options, '__dict__') else ''}")
    if plan.trl_config:
        print(f"{indent}training: " + ", ".join(f"{k}={v}" for k, v in plan.trl_config.items()))
    if plan.prompt_form is not None and (plan.prompt_form.chat or plan.prompt_form.system):
        print(f"{indent}prompts:  {plan.prompt_form.describe()}")
    for note in plan.data_notes:
        print(f"{indent}data:     {note}")


def _cmd_validate(args) -> int:
    from .pipeline import load

    pipeline = load(resolve_recipe(args.recipe), args.set, args.unset)
    if pipeline.single:
        plan = pipeline.plans[0]
        print(f"recipe '{plan.recipe.name}' is valid")
        _describe_plan(plan)
        return 0
    print(f"pipeline '{pipeline.name}' is valid: {len(pipeline.stages)} stages")
    for stage in pipeline.stages:
        print(f"  {stage.dir_name}")
        _describe_plan(stage.plan, "    ")
    return 0


def _cmd_estimate(args) -> int:
    from .estimate import estimate_recipe, parse_gpu_memory, parse_processes, print_report, report_json

    gpu = parse_gpu_memory(args.gpu_memory) if args.gpu_memory is not None else None
    processes = parse_processes(args.processes)
    prompt_length = None
    if args.prompt_length is not None:
        try:
            prompt_length = int(args.prompt_length)
        except ValueError:
            prompt_length = 0
        if prompt_length < 1:
            raise UserError(f"cannot read '{args.prompt_length}' as a number of tokens", field="--prompt-length",
                            fix="give the typical prompt length in tokens, e.g. --prompt-length 256")
    reports = estimate_recipe(resolve_recipe(args.recipe), args.set, args.unset, gpu=gpu, processes=processes,
                              prompt_length=prompt_length)
    if args.json:
        print(json.dumps(report_json(reports, args.recipe), indent=2))
    else:
        print_report(reports, args.recipe, args.set, args.unset)
    return 0


def _cmd_plugins(args) -> int:
    """Exit 0, or 2 when installed packages fight over a plugin name (the listing says which)."""
    from .registry import discover_all

    found, failures, conflicts = discover_all()
    rows = [{
        "name": info.name, "version": info.version, "distribution": info.distribution,
        "entry_point": info.entry_point, "description": info.cls.description, "hooks": info.hooks,
        "options": info.cls.options_schema(),
    } for info in found.values()]
    failed = [{"name": f.name, "distribution": f.distribution, "entry_point": f.entry_point, "reason": f.reason}
              for f in failures]
    clashes = [{"name": c.name, "providers": [{"distribution": d, "entry_point": v} for d, v in c.providers],
                "used": ({"distribution": c.kept[0], "entry_point": c.kept[1]} if c.kept else None),
                "message": c.describe()} for c in conflicts]
    code = 2 if conflicts else 0
    if args.json:
        print(json.dumps({"plugins": rows, "failed": failed, "conflicts": clashes}, indent=2, default=str))
        return code
    for row in rows:
        print(f"{row['name']}  {row['distribution']} {row['version']}  -  {row['description']}")
        print(f"    hooks:   {', '.join(h.removeprefix('posttrain_') for h in row['hooks'])}")
        if not row["options"]:
            print("    options: none")
        for i, o in enumerate(row["options"]):
            label = "    options: " if i == 0 else " " * 13
            about = f"  -  {o['help']}" if o["help"] else ""
            value = "(required)" if o.get("required") else f"= {o['default']!r}"
            print(f"{label}{o['name']}: {o['type']} {value}{about}")
    for f in failed:
        print(f"FAILED {f['name']}  ({f['distribution']}, {f['entry_point']}): {f['reason']}")
    for c in conflicts:
        print(f"CONFLICT {c.name}: {c.describe()}")
        for dist, value in c.providers:
            used = "  <- used" if c.kept == (dist, value) else ""
            print(f"    {dist}: {value}{used}")
    if conflicts:
        print("posttrain: error: installed packages register the same plugin name; uninstall all but one, or name "
              "the plugin you mean by import path (module.path:ClassName) in recipes", file=sys.stderr)
    if not rows and not failed:
        print("no plugins installed")
    return code


def _cmd_stages(args) -> int:
    """The stages: what each trains on, the data it takes, its own recipe keys and the hooks it calls."""
    import dataclasses

    from .plugin import type_name
    from .stages import STAGES

    rows = []
    for stage in STAGES.values():
        options = []
        for f in dataclasses.fields(stage.Options):
            options.append({"name": f.name, "type": type_name(f.type) if not isinstance(f.type, str) else f.type,
                            "help": f.metadata.get("help", "")})
        rows.append({"name": stage.name, "about": stage.about, "trainer": stage.trainer,
                     "config": stage.config.name if stage.config else None,
                     "layouts": [list(layout) for layout in stage.layouts], "options": options,
                     "default_plugins": stage.default_plugins, "hooks": list(stage.hooks),
                     "required_hooks": list(stage.required_hooks)})
    if args.json:
        print(json.dumps({"stages": rows}, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']}  -  {row['about']}")
        print(f"    trainer: {row['trainer']}" + (f" ({row['config']} under `training`)" if row["config"] else ""))
        print("    data:    " + " or ".join("/".join(layout) for layout in row["layouts"]))
        for o in row["options"]:
            print(f"    key:     {o['name']}: {o['type']}  -  {o['help']}")
        print(f"    hooks:   {', '.join(h.removeprefix('posttrain_') for h in row['hooks'])}")
        if row["required_hooks"]:
            print(f"    needs:   a plugin implementing {', '.join(row['required_hooks'])}")
    return 0


def _shipped(name: str) -> Path:
    path = recipes_dir() / f"{name}.yaml"
    if not path.is_file():
        from .errors import did_you_mean

        names = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
        raise UserError(f"no shipped recipe is called '{name}'{did_you_mean(name, names)}", field="NAME",
                        fix="`posttrain recipes` lists them")
    return path


def _cmd_init(args) -> int:
    """Write a shipped recipe out to edit, with the files it names relative to itself (a DeepSpeed config)."""
    import shutil

    import yaml

    source = _shipped(args.name)
    target = Path(args.file or f"{args.name}.yaml")
    if target.exists() and not args.overwrite:
        raise UserError(f"'{target}' already exists", field="FILE", fix="give another file name, or --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    copied = [target]
    data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    for section in [data, *(data.get("stages") or [])]:
        value = ((section or {}).get("training") or {}).get("deepspeed")
        if isinstance(value, str) and not Path(value).is_absolute() and (source.parent / value).is_file():
            destination = target.parent / value
            if not destination.exists():
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source.parent / value, destination)
                copied.append(destination)
    for path in copied:
        print(f"wrote {path}")
    print(f"edit it, then: posttrain validate {target} && posttrain run {target}")
    return 0


def _cmd_recipes(args) -> int:
    import yaml

    if args.show:
        sys.stdout.write(_shipped(args.show).read_text(encoding="utf-8"))
        return 0
    folder = recipes_dir()
    files = sorted(folder.glob("*.yaml"))
    if not files:
        print(f"no recipes found in {folder}")
        return 0
    width = max(len(f.stem) for f in files)
    for f in files:
        try:
            desc = (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("description", "")
        except yaml.YAMLError:
            desc = "(not valid YAML)"
        print(f"{f.stem:<{width}}  {desc}")
    return 0


# Shown for every stage, after the stage's own rows (Stage.summary_rows).
ANSWER_ROWS = (
    ("greedy answer accuracy", "answers", "answer_accuracy"),
    ("greedy answer mean reward", "answers", "mean_reward"),
)


def _summary_rows(stage_name: str | None) -> tuple:
    from .stages import STAGES

    stage = STAGES.get(stage_name or "")
    return (*(stage.summary_rows if stage is not None else ()), *ANSWER_ROWS)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"  # None: not measured, or every completion abstained


def _print_metrics(summary: dict, indent: str = "  ") -> None:
    before, after = summary.get("before") or {}, summary.get("after") or {}
    shown = False
    for label, group, key in _summary_rows(summary.get("stage")):
        b = ((before.get(group) or {}).get(key))
        a = ((after.get(group) or {}).get(key))
        if a is None and b is None:
            continue
        if not shown:
            print(f"{indent}{'metric':<30} {'before':>8} {'after':>8}")
            shown = True
        print(f"{indent}{label:<30} {_fmt(b):>8} {_fmt(a):>8}")
    # With several reward sources the accuracy above is the share of positive weighted totals; each
    # source's own mean says which one moved (a verifier's mean is its accuracy).
    b_src = ((before.get("answers") or {}).get("by_source")) or {}
    a_src = ((after.get("answers") or {}).get("by_source")) or {}
    if len(set(b_src) | set(a_src)) > 1:
        for name in sorted(set(b_src) | set(a_src)):
            print(f"{indent}{'  greedy answers, ' + name:<30} {_fmt(b_src.get(name)):>8} {_fmt(a_src.get(name)):>8}")
    bench = summary.get("lm_eval") or {}
    if bench:
        from .benchmarks import headline

        b, a = headline(bench.get("before") or {}), headline(bench.get("after") or {})
        for key in sorted(set(b) | set(a)):
            print(f"{indent}{'lm-eval ' + key:<30} {_fmt(b.get(key)):>8} {_fmt(a.get(key)):>8}")
    if summary.get("reward_first_third") is not None or summary.get("reward_curve"):
        print(f"{indent}training reward, mean of the first / last third of the steps: "
              f"{_fmt(summary.get('reward_first_third'))} -> {_fmt(summary.get('reward_last_third'))}")


def _print_summary(run_dir: Path, summary: dict) -> None:
    if "stages" in summary:  # a pipeline
        print(f"\npipeline '{summary['pipeline']}' finished -> {run_dir}")
        for stage in summary["stages"]:
            took = f", {stage['seconds']:.0f} s" if stage.get("seconds") is not None else ""
            print(f"  {stage['dir']} ({stage['stage']}, {stage['global_step']} steps{took})")
            _print_metrics(stage, "    ")
    else:
        print(f"\nrun '{summary['recipe']}' finished: {summary['global_step']} steps -> {run_dir}")
        _print_metrics(summary)
    print(f"  summary: {run_dir / 'summary.json'}")


def _quiet_third_party_noise() -> None:
    """Deprecation chatter from the libraries we drive is not the user's to act on."""
    if os.environ.get("POSTTRAIN_DEBUG"):
        return
    import logging
    import warnings

    for module in ("transformers", "trl", "peft", "accelerate", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # optional "kernels" package


def _cmd_run(args) -> int:
    """Exit 0 when the run finished; PREEMPTED_EXIT (75) when a signal stopped it after saving (the
    command to continue is printed); 2 for a user error; 1 for a bug of ours."""
    from .process import PREEMPTED_EXIT, Preempted, is_main, stop_handlers
    from .runner import run

    _quiet_third_party_noise()
    try:
        with stop_handlers():
            run_dir, summary = run(resolve_recipe(args.recipe), args.set, args.output_dir, removals=args.unset,
                                   resume=args.resume, overwrite=args.overwrite, start_from=args.start_from)
    except Preempted as stop:
        if is_main():
            print(f"posttrain: stopped on {stop.signal_name}: {stop.stage} stage, after step {stop.step}, "
                  f"checkpoint saved in {stop.checkpoint}\n  continue with: {_continue_command(args, stop)}",
                  file=sys.stderr)
        return PREEMPTED_EXIT
    if is_main():
        _print_summary(run_dir, summary)
    return 0


def _continue_command(args, stop) -> str:
    """The command that continues a stopped run: the same recipe and overrides, its folder, --resume."""
    import shlex

    from .process import world_size

    top = getattr(stop, "top", None) or stop.run_dir
    words = ["posttrain", "run", args.recipe, "--output-dir", str(top), "--resume"]
    for item in args.set:
        words += ["--set", item]
    for item in args.unset:
        words += ["--unset", item]
    command = " ".join(shlex.quote(w) for w in words)
    return command + ("  (under the same launcher, with the same number of processes)" if world_size() > 1 else "")


def _cmd_eval(args) -> int:
    """Benchmarks through lm-evaluation-harness; eval.json into the run directory (or --output)."""
    from . import benchmarks

    _quiet_third_party_noise()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("no task given", field="--tasks", fix="e.g. --tasks gsm8k,ifeval")
    limit = None
    if args.limit is not None:
        limit = float(args.limit) if "." in args.limit else int(args.limit)
    target = benchmarks.target_of(args.model)
    record = benchmarks.evaluate(target, tasks, limit=limit, include_path=args.include_path,
                                 num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                                 apply_chat_template=args.apply_chat_template)
    print(benchmarks.table(record))
    path = Path(args.model)
    out = Path(args.output) if args.output else (path / "eval.json" if path.is_dir() and
                                                  not (path / "config.json").is_file() else None)
    if out is not None:
        out.write_text(json.dumps(record, indent=2), encoding="utf-8")
        print(f"results: {out}")
    return 0


def _cmd_compare(args) -> int:
    from .compare import compare, table

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    runs, out = compare(args.runs, args.output, args.overwrite, metrics)
    print(table(runs))
    print(f"\nwritten: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="LLM post-training methods as plugins, "
                                     "composed by YAML recipes into TRL trainers.")
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_args(p):
        p.add_argument("recipe", help="a recipe file, or the name of a shipped recipe (see `posttrain recipes`)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key, e.g. --set training.learning_rate=1e-5 (repeatable); "
                            "--set plugins.NAME={} enables a plugin with its defaults")
        p.add_argument("--unset", action="append", default=[], metavar="KEY",
                       help="remove a recipe key, e.g. --unset plugins.ref_ema to disable a plugin (repeatable)")

    p = sub.add_parser("run", help="train with a recipe")
    recipe_args(p)
    p.add_argument("--output-dir", help="run directory (default: the recipe's output_dir, else runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run directory from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory and start again")
    p.add_argument("--from", dest="start_from", metavar="STAGE",
                   help="pipelines: run again from this stage, keeping the earlier stages' outputs")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("validate", help="check a recipe without loading anything heavy")
    recipe_args(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("estimate", help="predict peak GPU memory per device (no torch import, nothing loaded)")
    recipe_args(p)
    p.add_argument("--gpu-memory", metavar="SIZE", help="the GPU's memory for a verdict, e.g. 24GB, 24GiB, 80G or 24")
    p.add_argument("--processes", metavar="N", help="processes (GPUs) the run uses (default: WORLD_SIZE, else 1)")
    p.add_argument("--prompt-length", metavar="TOKENS", help="online stage: typical prompt length (default 512)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_estimate)

    p = sub.add_parser("plugins", help="list installed plugins and any that failed to load")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("eval", help="standard benchmarks (lm-evaluation-harness) on a model or a run's output")
    p.add_argument("model", metavar="MODEL_OR_RUN_DIR",
                   help="a run directory (its merged/ or final/ model; a LoRA adapter on its base), a model folder, a "
                        "hub id or builtin:NAME")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks, e.g. gsm8k,ifeval,arc_easy")
    p.add_argument("--limit", help="examples per task (or a fraction, e.g. 0.1)")
    p.add_argument("--include-path", help="a folder of your own task YAML files")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts with the chat template")
    p.add_argument("--output", help="where to write the results (default: eval.json in a run directory)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("compare", help="compare runs: a table and a PNG of their curves")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by `posttrain run`")
    p.add_argument("--output", default="compare.png",
                   help="the figure (.png), the table and figure (.html), or the table (.csv); default compare.png")
    p.add_argument("--metrics", help="comma-separated panels to draw (e.g. loss,reward or preference/margin); "
                                     "default: every panel the runs need")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("stages", help="list the stages: their trainer, data, own recipe keys and hooks")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_stages)

    p = sub.add_parser("recipes", help="list the shipped recipes (or print one with --show NAME)")
    p.add_argument("--show", metavar="NAME", help="print the shipped recipe NAME")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("init", help="write a shipped recipe out to edit (and the files it names)")
    p.add_argument("name", metavar="NAME", help="a shipped recipe (see `posttrain recipes`)")
    p.add_argument("file", metavar="FILE", nargs="?", help="where to write it (default: NAME.yaml here)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=_cmd_init)
    return parser


def _end_distributed_process(code: int) -> None:
    """End a rank of a multi-process run without the C++ teardown at interpreter exit.

    After a complete run (summary written, process group destroyed), a communication thread left
    in torch/DeepSpeed can still abort the process during finalisation ("terminate called without
    an active exception"), turning success into exit status -6 for the launcher. Python's own exit
    handlers run first (trackers flush there); then the process ends with the real status.
    """
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = _dispatch(args)
    from .process import world_size

    if args.func is _cmd_run and world_size() > 1 and argv is None:
        _end_distributed_process(code)
    return code


def _dispatch(args) -> int:
    try:
        return args.func(args)
    except UserError as e:
        print(f"posttrain: error: {e.render()}", file=sys.stderr)
        if os.environ.get("POSTTRAIN_DEBUG"):
            traceback.print_exc()
        return 2
    except KeyboardInterrupt:
        print("posttrain: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`posttrain plugins | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception:
        traceback.print_exc()
        print("posttrain: internal error (the traceback above); please report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
