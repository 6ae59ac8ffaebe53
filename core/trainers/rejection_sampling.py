"""The rejection_sampling stage: sample N completions per prompt from the model, score them with the
reward sources, keep each prompt's best (at least ``sampling.min_score``) and write them as an SFT
dataset, ``dataset.jsonl`` (``prompt``, ``completion``, the prompt's other columns, ``reward``).
Llama 3's loop: a following ``sft`` stage of the same pipeline trains on it with ``data: {source:
stages.NAME}``. Nothing is trained here; the stage's model output is the model it sampled from, so
the next stage starts from the same weights.

Written next to the dataset: ``samples.jsonl`` (every sample and its rewards) and, in
``summary.json``, the kept/dropped counts per reason (every sample abstained; best below
``min_score``) and the distribution of the best and of all rewards.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..models import load_model, load_tokenizer, resolve_model_path, run_precision
from ..process import distributed_state, is_main
from ..sampling import derive_seed
from ..validate import Plan
from .parts import load_data
from .prompts import limit_prompts
from .rollouts import compute_autocast, round_prompts, sample_and_score, write_jsonl

STAGE = "rejection_sampling"


def distribution(values: list[float]) -> dict | None:
    """Mean, standard deviation, quartiles and extremes of some rewards."""
    if not values:
        return None
    values = sorted(values)
    n = len(values)
    mean = sum(values) / n
    quantile = lambda q: values[min(n - 1, int(q * (n - 1) + 0.5))]  # noqa: E731
    return {"n": n, "mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, n - 1)),
            "min": values[0], "p25": quantile(0.25), "median": quantile(0.5), "p75": quantile(0.75), "max": values[-1]}


def keep_best(scored: list[dict], min_score: float | None) -> tuple[list[dict], dict]:
    """Each prompt's best sample as an SFT record (or none), and the counts by reason."""
    counts = {"prompts": len(scored), "kept": 0, "dropped_all_abstained": 0, "dropped_below_min_score": 0}
    records = []
    for item in scored:
        rewards = item["rewards"]
        scored_ids = [i for i, r in enumerate(rewards) if r is not None]
        if not scored_ids:
            counts["dropped_all_abstained"] += 1
            continue
        best = max(scored_ids, key=lambda i: rewards[i])
        if min_score is not None and rewards[best] < min_score:
            counts["dropped_below_min_score"] += 1
            continue
        row = {k: v for k, v in item["row"].items() if k not in ("chosen", "rejected", "completion")}
        prompt = row["prompt"]
        text = item["completions"][best]
        completion = [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
        records.append({**row, "completion": completion, "reward": rewards[best]})
    counts["kept"] = len(records)
    return records, counts


def run(plan: Plan, run_dir: Path, resume: bool, dataset: Path) -> dict:
    recipe = plan.recipe
    started = time.time()
    train, _ = load_data(plan)
    precision = run_precision(recipe)
    path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(recipe, path)
    train = limit_prompts(plan, train, tokenizer, "train")
    model, _ = load_model(recipe, path, precision)  # nothing is trained: a LoRA section is not used here
    model.to(distributed_state().device).eval()
    autocast = compute_autocast(precision)
    rows = round_prompts([train[i] for i in range(len(train))], plan.options.sampling, 1, recipe.seed)
    seed = derive_seed(recipe.seed, "rejection_sampling")
    scored = sample_and_score(plan, model, tokenizer, rows, autocast, seed)
    records, counts = keep_best(scored, plan.options.sampling.min_score)
    main = is_main()
    if main:
        write_jsonl(run_dir / "samples.jsonl", [
            {"prompt": s["row"]["prompt"], "completions": s["completions"], "rewards": s["rewards"],
             "by_source": s["by_source"]} for s in scored])
        write_jsonl(dataset, records)
        print(f"posttrain: rejection sampling kept {counts['kept']} of {counts['prompts']} prompts "
              f"({counts['dropped_all_abstained']} with no scored sample, {counts['dropped_below_min_score']} below "
              f"min_score) -> {dataset}", flush=True)
    summary = {
        "recipe": recipe.name, "stage": STAGE, "plugins": list(plan.plugins.by_name), "global_step": 0,
        "model": path, "dataset": str(dataset), **counts,
        "samples_per_prompt": plan.options.sampling.samples, "seed": seed,
        "best_rewards": distribution([r["reward"] for r in records]),
        "all_rewards": distribution([x for s in scored for x in s["rewards"] if x is not None]),
        "data_transforms": plan.data_log, "data_sources": plan.data_sources, "seconds": round(time.time() - started, 1),
        "before": {}, "after": {},
    }
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
