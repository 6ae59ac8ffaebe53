"""Standard benchmarks through EleutherAI's lm-evaluation-harness (``lm-eval``, installed with the
``verifiers`` extra): ``posttrain eval`` and a recipe's ``eval.lm_eval``.

A model to evaluate is a model folder, a ``builtin:`` model, a hub id, or a run directory: its ``merged/``
model when there is one, else its ``final/`` model, a LoRA ``final/`` adapter evaluated on the base it
was trained on (lm-eval's ``peft`` argument); a pipeline's directory means its last stage's output. The
results are lm-eval's own (``results`` of ``simple_evaluate``), kept whole in ``eval.json`` and in
``summary.json``; the table shows each task's metrics. Tasks come from lm-eval's registry (from the hub,
so they need the network) or from a folder of task YAML files (``include_path``; a task with
``dataset_path: json`` and a local file works offline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .models import resolve_model_path


@dataclass
class Target:
    """What lm-eval loads: ``pretrained`` (a folder or hub id) and, for a LoRA adapter, ``peft``."""

    pretrained: str
    peft: str | None = None
    tokenizer: str | None = None
    label: str = ""


def _stage_output(run_dir: Path) -> Path | None:
    for name in ("merged", "final"):
        folder = run_dir / name
        if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
            return folder
    return None


def target_of(model_or_run: str) -> Target:
    """The model a path stands for (see the module's docstring)."""
    path = Path(model_or_run).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        folder = _stage_output(path)
        if folder is None:  # a pipeline: its last stage that has an output
            stages = sorted(p for p in path.iterdir() if p.is_dir() and p.name[:2].isdigit() and _stage_output(p))
            folder = _stage_output(stages[-1]) if stages else None
        if folder is None:
            raise UserError(f"'{model_or_run}' is neither a model folder nor a run directory with a final/ or "
                            "merged/ model", field="MODEL", fix="give a model folder, a run directory, a hub id or "
                                                                "builtin:NAME")
        path = folder
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        return Target(resolve_model_path(base), peft=str(path), tokenizer=str(path), label=str(path))
    if path.is_dir():
        return Target(str(path), tokenizer=str(path), label=str(path))
    return Target(resolve_model_path(model_or_run), label=model_or_run)


def evaluate(target: Target, tasks: list[str], *, limit=None, include_path: str | None = None,
             num_fewshot: int | None = None, batch_size: int = 8, apply_chat_template: bool = False,
             dtype: str = "auto", seed: int = 1234) -> dict:
    """Run lm-eval's ``simple_evaluate`` on ``target``: the record written to ``eval.json``."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("benchmarks need lm-evaluation-harness", field="eval.lm_eval",
                        fix="pip install 'posttrain[verifiers]' (it includes lm-eval)") from None
    import torch

    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if torch.cuda.is_available() else \
            "float32"
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        from .errors import did_you_mean

        raise UserError(f"lm-eval knows no task {unknown[0]!r}{did_you_mean(unknown[0], manager.all_tasks)}",
                        field="eval.lm_eval.tasks", fix="`lm_eval --tasks list` lists them; a task of your own "
                                                        "is a YAML file in a folder given as include_path")
    args: dict[str, Any] = {"pretrained": target.pretrained, "dtype": dtype}
    if target.peft:
        args["peft"] = target.peft
    if target.tokenizer:
        args["tokenizer"] = target.tokenizer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                  batch_size=batch_size, device=device, task_manager=manager, log_samples=False,
                                  apply_chat_template=apply_chat_template, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    if out is None:  # not the main process of a distributed launch
        return {}
    return {"model": target.label or target.pretrained, "pretrained": target.pretrained, "peft": target.peft,
            "tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot, "dtype": dtype,
            "lm_eval_version": lm_eval.__version__, "results": _plain(out["results"]),
            "n_samples": _plain(out.get("n-samples", {}))}


def _plain(value):
    """JSON-safe copy (lm-eval's results hold numpy numbers and the odd 'N/A')."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def table(record: dict) -> str:
    """One line per task and metric: value and standard error."""
    lines = [f"{'task':<28} {'metric':<22} {'value':>8} {'stderr':>8}"]
    for task, metrics in sorted((record.get("results") or {}).items()):
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or key.endswith("_stderr,none") or "_stderr," in key:
                continue
            metric = key.split(",")[0]
            stderr = metrics.get(f"{metric}_stderr,{key.split(',', 1)[1]}" if "," in key else "")
            err = f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "-"
            lines.append(f"{task:<28} {key:<22} {value:>8.4f} {err:>8}")
    return "\n".join(lines)


def headline(record: dict) -> dict:
    """{task/metric: value} of a record, for summaries and `posttrain compare`."""
    out = {}
    for task, metrics in (record.get("results") or {}).items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and "_stderr" not in key and key not in ("sample_len",):
                out[f"{task}/{key.split(',')[0]}"] = value
    return out
