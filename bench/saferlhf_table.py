"""The DPO-vs-PPO study's SafeRLHF table in miniature: run every row's recipe, then evaluate every row's
model on the same held-out prompts.

Rows (recipes/saferlhf-*.yaml, SmolLM2-135M-Instruct with LoRA on the built-in safety task): SFT;
DPO; + SFT on the safe chosen responses; + filter dual-unsafe pairs; + filter dual-safe pairs;
iterative DPO rounds 1, 2 and 3; PPO (a reward model trained on the DPO rows' pairs, then PPO with a
critic initialised from it and the KL in the reward); PPO after the safe-SFT stage. Each recipe is a
pipeline that starts with the same SFT stage.
The evaluation: greedy answers (up to 32 tokens) to 100 held-out prompts of the built-in
``safety_prompts`` generator (a seed none of the rows trains on; half benign questions, half
requests for the secret or the forbidden action), judged by the task's rules:

- safety rate: the share of answers that reveal no secret and perform no forbidden action;
- helpfulness: the share of helpful answers (a benign question answered, a harmful request refused),
  also split into benign answered and harmful refused.

    python bench/saferlhf_table.py [--out runs/saferlhf-table] [--prompts 100] [--rows 0-sft,1-dpo,...]
                                   [--seeds 0,1,2]
                                   [--set KEY=VALUE ...]   (applied to every row, e.g. stages.dpo.training.max_steps=2)
                                   [--reuse DIR]

With ``--seeds``, every row is trained once per seed (the recipe's ``seed``: LoRA initialisation, data
order, sampling; the data itself stays the same), in ``OUT/seed-S/``, and the table gives each row's
mean, standard deviation and range over the seeds beside every seed's numbers.

Rows whose run finished are not run again (an interrupted one is resumed), so the command can be
repeated; a row's first stages that an earlier row trained with the same recipe (every row's SFT
stage, the fix rows' safe-SFT stage) are hard-linked from that row instead of trained again. Prints
the table as JSON and Markdown and writes both next to the runs.

``--reuse DIR`` lets the rows take their first stages from the finished runs of another table folder
too (``DIR``, or ``DIR/seed-S`` with ``--seeds``), under the same rule: the same model, seed and stage
recipes. A variant of a row that changes only its last stage, e.g. ``--rows 6-ppo --set
stages.ppo.training.beta=0.2 --reuse runs/saferlhf-seeds``, then trains that stage alone. Nothing in
``DIR`` is changed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

REPO = Path(__file__).resolve().parent.parent
ROWS = ["0-sft", "1-dpo", "2-safe-sft", "3-filter-dual-unsafe", "4-filter-dual-safe", "5-iterative", "6-ppo",
        "7-safe-sft-ppo"]
LABELS = {"0-sft": "SFT", "1-dpo": "DPO", "2-safe-sft": "+ SFT on safe data (fix 1)",
          "3-filter-dual-unsafe": "+ filter dual-unsafe (fix 3)", "4-filter-dual-safe": "+ filter dual-safe (fix 3)",
          "6-ppo": "PPO", "7-safe-sft-ppo": "PPO + SFT on safe data"}
# the study's numbers (methods.md): safety rate, ΔHelp
STUDY = {"SFT": ("41.6%", "-2.62"), "PPO": ("99.5%", "1.69"), "PPO + SFT on safe data": ("99.6%", "4.47"),
         "DPO": ("55.4%", "-4.19"), "+ SFT on safe data (fix 1)": ("71.8%", "-1.62"),
         "+ filter dual-unsafe (fix 3)": ("80.8%", "2.46"), "+ filter dual-safe (fix 3)": ("95.8%", "-2.86"),
         "iterative DPO, round 1": ("86.7%", "-3.22"), "iterative DPO, round 2": ("99.7%", "-3.27"),
         "iterative DPO, round 3": ("99.9%", "-3.26")}


def row_overrides(row: str, overrides: list[str]) -> list[str]:
    """The overrides that apply to ``row``: a ``stages.NAME.`` one only where the row has that stage."""
    import yaml

    names = {s["name"] for s in yaml.safe_load((REPO / "recipes" / f"saferlhf-{row}.yaml").read_text())["stages"]}
    return [o for o in overrides if not o.startswith("stages.") or o.split(".")[1] in names]


def pipeline_data(row: str, overrides: list[str]) -> dict:
    """The row's pipeline as its run directory records it (``recipe.yaml``)."""
    from posttrain.pipeline import load

    return load(str(REPO / "recipes" / f"saferlhf-{row}.yaml"), overrides).data


def shared_stages(data: dict, done: dict[str, tuple[dict, Path]]) -> tuple[Path | None, int]:
    """The finished row whose first stages are the same as this row's (same model, seed and stage
    recipes, in the same order), and how many: those stages are reused instead of trained again."""
    def top(d):
        return {k: v for k, v in d.items() if k not in ("name", "description", "stages")}

    best, count = None, 0
    for other, other_dir in done.values():
        if top(other) != top(data):
            continue
        n = 0
        while n < min(len(data["stages"]) - 1, len(other["stages"])) and data["stages"][n] == other["stages"][n]:
            n += 1
        if n > count:
            best, count = other_dir, n
    return best, count


def seed_from(run_dir: Path, data: dict, source: Path, count: int) -> None:
    """Start ``run_dir`` as a pipeline whose first ``count`` stages finished: their folders are hard-linked
    from ``source`` (nothing is copied or changed there); ``posttrain run --resume`` then skips them."""
    import shutil

    import yaml

    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    for stage_dir in sorted(p for p in source.iterdir() if p.is_dir() and p.name[:2].isdigit())[:count]:
        shutil.copytree(stage_dir, run_dir / stage_dir.name, copy_function=os.link)


def finished_runs(folder: Path) -> dict[str, tuple[dict, Path]]:
    """The finished row runs in ``folder`` (a ``summary.json`` and the ``recipe.yaml`` they ran), keyed by
    folder, in the form ``run_row``'s ``done`` takes: their stages can be reused."""
    import yaml

    found = {}
    for run_dir in sorted(folder.glob("saferlhf-*")) if folder.is_dir() else []:
        if (run_dir / "summary.json").is_file() and (run_dir / "recipe.yaml").is_file():
            found[f"reuse:{run_dir}"] = (yaml.safe_load((run_dir / "recipe.yaml").read_text()), run_dir)
    return found


def run_row(row: str, out: Path, overrides: list[str], done: dict[str, tuple[dict, Path]]) -> Path:
    """Run (or resume, or skip) one row's pipeline; its run directory. Stages that an earlier row
    already trained with the same recipe (every row's SFT stage; the safe-SFT stage of the fix rows)
    are reused from it."""
    from posttrain.runner import run

    run_dir = out / f"saferlhf-{row}"
    recipe = str(REPO / "recipes" / f"saferlhf-{row}.yaml")
    overrides = row_overrides(row, overrides)
    data = pipeline_data(row, overrides)
    if (run_dir / "summary.json").is_file():
        print(f"[table] {row}: finished earlier", file=sys.stderr)
        done[row] = (data, run_dir)
        return run_dir
    if not run_dir.exists():
        source, count = shared_stages(data, done)
        if source is not None:
            seed_from(run_dir, data, source, count)
            print(f"[table] {row}: its first {count} stage(s) are "
                  f"{source.name if source.parent == out else source}'s (same recipe): reused",
                  file=sys.stderr)
    started = time.time()
    run(recipe, overrides, str(run_dir), resume=(run_dir / "recipe.yaml").is_file())
    done[row] = (data, run_dir)
    print(f"[table] {row}: {time.time() - started:.0f} s", file=sys.stderr)
    return run_dir


def models_of(row: str, run_dir: Path) -> list[tuple[str, Path, Path | None]]:
    """(label, model folder, adapter folder or None) for each table line of a row."""
    from posttrain.compare import pipeline_stages

    stages = pipeline_stages(run_dir)
    if row != "5-iterative":
        return [(LABELS[row], stages[-1] / "merged", None)]
    sft, iterative = stages[0] / "merged", stages[-1]
    return [(f"iterative DPO, round {r}", sft, iterative / f"round-{r:02d}" / "final") for r in (1, 2, 3)]


def load(model_dir: Path, adapter: Path | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    has_tokenizer = adapter is not None and (adapter / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter if has_tokenizer else model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def evaluate(model, tokenizer, rows: list[dict], max_new_tokens: int) -> dict:
    import posttrain
    from posttrain.sampling import default_sample

    prompts = [r["prompt"] for r in rows]
    answers = [s[0] for s in default_sample(model, tokenizer, prompts, 1,
                                            {"max_new_tokens": max_new_tokens, "do_sample": False})]
    columns = {k: [r[k] for r in rows] for k in ("safety_kind", "secret", "forbidden_action", "ground_truth")}
    safe = posttrain.score("safety", answers, prompts=prompts, **columns)
    helpful = posttrain.score("helpful", answers, prompts=prompts, **columns)
    benign = [i for i, r in enumerate(rows) if r["safety_kind"] == "benign"]
    harmful = [i for i, r in enumerate(rows) if r["safety_kind"] != "benign"]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"n": len(rows), "safety_rate": mean(safe), "helpfulness": mean(helpful),
            "benign_answered": mean([helpful[i] for i in benign]),
            "harmful_refused": mean([helpful[i] for i in harmful]),
            "benign_safe": mean([safe[i] for i in benign]), "harmful_safe": mean([safe[i] for i in harmful]),
            "examples": [{"prompt": prompts[i][-1]["content"][-80:], "answer": answers[i], "safe": safe[i],
                          "helpful": helpful[i]} for i in (benign[:1] + harmful[:2])]}


METRICS = ("safety_rate", "helpfulness", "benign_answered", "harmful_refused")


def by_row(table: list[dict]) -> list[dict]:
    """Each row's numbers over the seeds it was trained with: mean, sample standard deviation, min, max
    and the values, in the table's order."""
    import statistics

    groups: dict[str, list[dict]] = {}
    for line in table:
        groups.setdefault(line["row"], []).append(line)
    out = []
    for row, lines in groups.items():
        entry = {"row": row, "seeds": [line.get("seed") for line in lines]}
        for key in METRICS:
            values = [line[key] for line in lines if line[key] is not None]
            entry[key] = {"mean": statistics.fmean(values) if values else None,
                          "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                          "min": min(values, default=None), "max": max(values, default=None), "values": values}
        out.append(entry)
    return out


def markdown_seeds(rows: list[dict]) -> str:
    lines = ["| row | seeds | safety rate | helpfulness | benign answered | harmful refused | study: safety rate | "
             "study: ΔHelp |", "|---|---|---|---|---|---|---|---|"]

    def cell(v: dict) -> str:
        if v["mean"] is None:
            return "-"
        if len(v["values"]) == 1:
            return f"{100 * v['mean']:.1f}%"
        return f"{100 * v['mean']:.1f}% ± {100 * v['sd']:.1f} ({100 * v['min']:.0f}-{100 * v['max']:.0f})"

    for entry in rows:
        study = STUDY.get(entry["row"], ("-", "-"))
        seeds = ",".join("-" if s is None else str(s) for s in entry["seeds"])
        lines.append(f"| {entry['row']} | {seeds} | " + " | ".join(cell(entry[k]) for k in METRICS)
                     + f" | {study[0]} | {study[1]} |")
    return "\n".join(lines)


def markdown(table: list[dict]) -> str:
    lines = ["| row | safety rate | helpfulness | benign answered | harmful refused | study: safety rate | "
             "study: ΔHelp |", "|---|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for line in table:
        study = STUDY.get(line["row"], ("-", "-"))
        label = line["row"] if line.get("seed") is None else f"{line['row']} (seed {line['seed']})"
        lines.append(f"| {label} | {pct(line['safety_rate'])} | {pct(line['helpfulness'])} | "
                     f"{pct(line['benign_answered'])} | {pct(line['harmful_refused'])} | {study[0]} | {study[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/saferlhf-table", help="folder of the row runs and the table")
    parser.add_argument("--prompts", type=int, default=100, help="held-out prompts per row")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rows", default=",".join(ROWS), help="rows to run, e.g. 0-sft,1-dpo")
    parser.add_argument("--seeds", default="", help="training seeds, e.g. 0,1,2: every row is trained once per "
                        "seed (in OUT/seed-S/) and the table gives each row's mean and spread (default: the "
                        "recipes' own seed, once)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override applied to every row (as posttrain run --set; stages.NAME.* only to "
                             "rows with that stage)")
    parser.add_argument("--reuse", default=None, metavar="DIR",
                        help="another table folder whose finished runs may lend their first stages (same model, "
                             "seed and stage recipes) instead of training them again; DIR/seed-S with --seeds")
    args = parser.parse_args(argv)
    from posttrain.builtin.safety import SafetyPromptOptions, safety_prompts
    from posttrain.models import resolve_model_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    heldout = safety_prompts(SafetyPromptOptions(n=args.prompts, seed=99))  # a seed no row trains on
    started = time.time()
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    passes = [(None, out, args.set)] if not seeds else \
        [(seed, out / f"seed-{seed}", [*args.set, f"seed={seed}"]) for seed in seeds]
    table = []
    start = pipeline_data(rows[0], row_overrides(rows[0], args.set))["model"]["name_or_path"]
    start_model, start_tokenizer = load(Path(resolve_model_path(start)), None)  # greedy: the same for every seed
    table.append({"row": f"start ({start}, no training)", "seed": None,
                  **evaluate(start_model, start_tokenizer, heldout, args.max_new_tokens)})
    for seed, folder, sets in passes:
        done: dict[str, tuple[dict, Path]] = {}
        if args.reuse:
            done.update(finished_runs(Path(args.reuse) if seed is None else Path(args.reuse) / f"seed-{seed}"))
        for row in rows:
            run_dir = run_row(row, folder, sets, done)
            for label, model_dir, adapter in models_of(row, run_dir):
                model, tokenizer = load(model_dir, adapter)
                table.append({"row": label, "seed": seed, "run": str(run_dir),
                              **evaluate(model, tokenizer, heldout, args.max_new_tokens)})
                print(f"[table] {label}{'' if seed is None else f' (seed {seed})'}: safety "
                      f"{table[-1]['safety_rate']:.3f}, helpfulness {table[-1]['helpfulness']:.3f}", file=sys.stderr)
    report = {"table": table, "heldout": {"generator": "safety_prompts", "n": args.prompts, "seed": 99},
              "seeds": seeds or None, "seconds": round(time.time() - started, 1)}
    text = markdown(table)
    if seeds:
        report["by_row"] = by_row(table)
        text = markdown_seeds(report["by_row"]) + "\n\nEvery seed:\n\n" + text
    (out / "table.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "table.md").write_text(text + "\n")
    print(json.dumps(report, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
