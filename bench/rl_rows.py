"""The online stage's RL rows: the six recipes rlvr-{grpo,dr-grpo,dapo,gspo,reinforce-pp,rloo}-cpu on one CPU
task, each over several seeds, and the table of docs/methods.md ("The RL rows") made from their runs.

    python bench/rl_rows.py run [--seeds 1 2 3] [--out runs/rl-rows] [--rows NAME ...]   (make rl-rows)
    python bench/rl_rows.py table [--out runs/rl-rows] [--json FILE]

``run`` runs each recipe once per seed (``--set seed=N``) into OUT/NAME-sN, skipping a run whose summary.json
exists, then writes OUT/compare.png (``posttrain compare`` of the first seed's runs). ``table`` prints the
markdown table, one row per recipe, each cell the mean over seeds (± the half range when seeds differ):

- held-out accuracy before → after: the greedy answers' share marked right by verify_gsm8k (80 questions);
- training accuracy first → last third: verify_gsm8k's mean over the sampled completions, over the first and the
  last third of the steps that sampled (with dynamic sampling, over every round sampled);
- completion length: TRL's completions/mean_length, mean over the steps that sampled;
- zero-variance groups: TRL's frac_reward_zero_std (the share of sampled groups whose completions all got the
  same reward), mean over the steps that sampled (with dynamic sampling, over every round sampled);
- entropy first → last: TRL's per-token entropy of the policy, mean of the first and of the last quarter of
  the steps;
- clipped share: TRL's clip_ratio/region_mean (the share of completion tokens whose ratio was clipped), mean
  over the steps;
- seconds per step: train_runtime / steps.

Only the standard library (the runs are posttrain's CLI in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS = ("rlvr-grpo-cpu", "rlvr-dr-grpo-cpu", "rlvr-dapo-cpu", "rlvr-gspo-cpu", "rlvr-reinforce-pp-cpu",
        "rlvr-rloo-cpu")
POSTTRAIN = [sys.executable, "-m", "posttrain.cli"]


def run(out: Path, seeds: list[int], rows: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for name in rows:
            folder = out / f"{name}-s{seed}"
            if (folder / "summary.json").exists():
                continue
            started = time.time()
            with open(out / f"{name}-s{seed}.log", "w") as log:
                code = subprocess.call([*POSTTRAIN, "run", str(REPO / "recipes" / f"{name}.yaml"), "--output-dir",
                                        str(folder), "--set", f"seed={seed}", "--overwrite"], stdout=log, stderr=log)
            print(f"{name} seed {seed}: exit {code}, {time.time() - started:.0f} s", flush=True)
    firsts = [str(out / f"{name}-s{seeds[0]}") for name in rows if (out / f"{name}-s{seeds[0]}" / "summary.json").exists()]
    subprocess.call([*POSTTRAIN, "compare", *firsts, "--output", str(out / "compare.png"), "--overwrite"])


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def measure(folder: Path) -> dict:
    """One run's numbers (see the module's docstring)."""
    summary = json.loads((folder / "summary.json").read_text())
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    sampled = [m for m in lines if "completions/mean_length" in m]
    stepped = [m for m in lines if "entropy" in m]
    quarter = max(1, len(stepped) // 4)
    runtime = next((m["train_runtime"] for m in lines if "train_runtime" in m), None)
    third = max(1, len(sampled) // 3)
    return {
        "train_first": _mean(m["rewards/verify_gsm8k/mean"] for m in sampled[:third]),
        "train_last": _mean(m["rewards/verify_gsm8k/mean"] for m in sampled[-third:]),
        "before": summary["before"]["answers"]["by_source"]["verify_gsm8k"],
        "after": summary["after"]["answers"]["by_source"]["verify_gsm8k"],
        "length": _mean(m["completions/mean_length"] for m in sampled),
        "zero_std": _mean(m.get("frac_reward_zero_std") for m in sampled),
        "entropy_first": _mean(m["entropy"] for m in stepped[:quarter]),
        "entropy_last": _mean(m["entropy"] for m in stepped[-quarter:]),
        "clipped": _mean(m.get("clip_ratio/region_mean") for m in stepped),
        "step_seconds": runtime / summary["global_step"] if runtime else None,
        "extra_completions": sum(m.get("filter_groups/extra_completions", 0) for m in sampled),
    }


def _cell(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean, half = sum(values) / len(values), (max(values) - min(values)) / 2
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if len(values) > 1 and half > 0 else "")


def table(out: Path) -> tuple[str, dict]:
    rows, data = [], {}
    header = ("| recipe | seeds | held-out accuracy before → after | training accuracy first → last third | "
              "completion length | zero-variance groups | entropy first → last | clipped share | s / step |\n"
              "|---|---|---|---|---|---|---|---|---|")
    for name in ROWS:
        runs = sorted(out.glob(f"{name}-s*/summary.json"))
        if not runs:
            continue
        measured = [measure(r.parent) for r in runs]
        data[name] = {r.parent.name: m for r, m in zip(runs, measured, strict=True)}
        column = lambda key: [m[key] for m in measured]  # noqa: E731
        rows.append(f"| `{name}` | {len(measured)} | {_cell(column('before'))} → {_cell(column('after'))} | "
                    f"{_cell(column('train_first'))} → {_cell(column('train_last'))} | "
                    f"{_cell(column('length'), 2)} | {_cell(column('zero_std'), 2)} | "
                    f"{_cell(column('entropy_first'), 2)} → {_cell(column('entropy_last'), 2)} | "
                    f"{_cell(column('clipped'), 4)} | "
                    f"{_cell(column('step_seconds'), 1)} |")
    return "\n".join([header, *rows]), data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "rl-rows")
    p = sub.add_parser("table")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "rl-rows")
    p.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.out, args.seeds, args.rows)
        return 0
    text, data = table(args.out)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
