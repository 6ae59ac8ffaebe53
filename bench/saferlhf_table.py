"""The DPO-vs-PPO study's SafeRLHF table in miniature: run every row's recipe, then evaluate every row's
model on the same held-out prompts.

Rows (recipes/saferlhf-*.yaml, SmolLM2-135M-Instruct with LoRA on the built-in safety task): SFT;
DPO; + SFT on the safe chosen responses; + filter dual-unsafe pairs; + filter dual-safe pairs;
iterative DPO rounds 1, 2 and 3. Each recipe is a pipeline that starts with the same SFT stage.
The evaluation: greedy answers (up to 32 tokens) to 100 held-out prompts of the built-in
``safety_prompts`` generator (a seed none of the rows trains on; half benign questions, half
requests for the secret or the forbidden action), judged by the task's rules:

- safety rate: the share of answers that reveal no secret and perform no forbidden action;
- helpfulness: the share of helpful answers (a benign question answered, a harmful request refused),
  also split into benign answered and harmful refused.

    python bench/saferlhf_table.py [--out runs/saferlhf-table] [--prompts 100] [--rows 0-sft,1-dpo,...]
                                   [--set KEY=VALUE ...]   (applied to every row, e.g. stages.dpo.training.max_steps=2)

Rows whose run finished are not run again (an interrupted one is resumed), so the command can be
repeated; prints the table as JSON and Markdown and writes both next to the runs.
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
ROWS = ["0-sft", "1-dpo", "2-safe-sft", "3-filter-dual-unsafe", "4-filter-dual-safe", "5-iterative"]
LABELS = {"0-sft": "SFT", "1-dpo": "DPO", "2-safe-sft": "+ SFT on safe data (fix 1)",
          "3-filter-dual-unsafe": "+ filter dual-unsafe (fix 3)", "4-filter-dual-safe": "+ filter dual-safe (fix 3)"}
# the study's numbers (methods.md): safety rate, ΔHelp
STUDY = {"SFT": ("41.6%", "-2.62"), "DPO": ("55.4%", "-4.19"), "+ SFT on safe data (fix 1)": ("71.8%", "-1.62"),
         "+ filter dual-unsafe (fix 3)": ("80.8%", "2.46"), "+ filter dual-safe (fix 3)": ("95.8%", "-2.86"),
         "iterative DPO, round 1": ("86.7%", "-3.22"), "iterative DPO, round 2": ("99.7%", "-3.27"),
         "iterative DPO, round 3": ("99.9%", "-3.26")}


def run_row(row: str, out: Path, overrides: list[str]) -> Path:
    """Run (or resume, or skip) one row's pipeline; its run directory."""
    from posttrain.run import run

    run_dir = out / f"saferlhf-{row}"
    recipe = str(REPO / "recipes" / f"saferlhf-{row}.yaml")
    if (run_dir / "summary.json").is_file():
        print(f"[table] {row}: finished earlier", file=sys.stderr)
        return run_dir
    started = time.time()
    run(recipe, overrides, str(run_dir), resume=(run_dir / "recipe.yaml").is_file())
    print(f"[table] {row}: {time.time() - started:.0f} s", file=sys.stderr)
    return run_dir


def models_of(row: str, run_dir: Path) -> list[tuple[str, Path, Path | None]]:
    """(label, model folder, adapter folder or None) for each table line of a row."""
    stages = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name[:2].isdigit())
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


def markdown(table: list[dict]) -> str:
    lines = ["| row | safety rate | helpfulness | benign answered | harmful refused | study: safety rate | "
             "study: ΔHelp |", "|---|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for line in table:
        study = STUDY.get(line["row"], ("-", "-"))
        lines.append(f"| {line['row']} | {pct(line['safety_rate'])} | {pct(line['helpfulness'])} | "
                     f"{pct(line['benign_answered'])} | {pct(line['harmful_refused'])} | {study[0]} | {study[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/saferlhf-table", help="folder of the row runs and the table")
    parser.add_argument("--prompts", type=int, default=100, help="held-out prompts per row")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rows", default=",".join(ROWS), help="rows to run, e.g. 0-sft,1-dpo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override applied to every row (as posttrain run --set)")
    args = parser.parse_args(argv)
    from posttrain.builtin.safety import SafetyPromptOptions, safety_prompts
    from posttrain.models import resolve_model_path
    from posttrain.recipe import load_recipe_data

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    heldout = safety_prompts(SafetyPromptOptions(n=args.prompts, seed=99))  # a seed no row trains on
    started = time.time()
    table = []
    start = load_recipe_data(str(REPO / "recipes" / f"saferlhf-{rows[0]}.yaml"), args.set)["model"]["name_or_path"]
    start_model, start_tokenizer = load(Path(resolve_model_path(start)), None)
    table.append({"row": f"start ({start}, no training)",
                  **evaluate(start_model, start_tokenizer, heldout, args.max_new_tokens)})
    for row in rows:
        run_dir = run_row(row, out, args.set)
        for label, model_dir, adapter in models_of(row, run_dir):
            model, tokenizer = load(model_dir, adapter)
            table.append({"row": label, "run": str(run_dir), **evaluate(model, tokenizer, heldout, args.max_new_tokens)})
            print(f"[table] {label}: safety {table[-1]['safety_rate']:.3f}, helpfulness {table[-1]['helpfulness']:.3f}",
                  file=sys.stderr)
    report = {"table": table, "heldout": {"generator": "safety_prompts", "n": args.prompts, "seed": 99},
              "seconds": round(time.time() - started, 1)}
    (out / "table.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "table.md").write_text(markdown(table) + "\n")
    print(json.dumps(report, indent=2, default=str))
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
