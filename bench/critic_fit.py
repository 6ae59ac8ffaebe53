"""How fast a critic learns the returns, for choosing its learning rate: the policy frozen, the critic
trained at several learning rates on the same stream of rollouts.

Each setting runs a shipped PPO recipe (default ``ppo-critic-0-baseline``: SmolLM2-135M-Instruct + LoRA,
the arithmetic task, the GSM8K-rule verifier, GAE with the KL in the reward) through ``posttrain run``
with the policy's learning rate at 0, so every setting sees rollouts from the same policy (same seed:
the same prompts and samples), and only ``plugins.critic.learning_rate`` changes. The measure is the
explained variance of the returns by the values, 1 - Var(G - V) / Var(G), logged each step
(``critic/explained_variance``) on rollouts the critic has not trained on yet, so it is out of sample;
also at each completion's last token (``critic/explained_variance_last``) and the value loss.

    python bench/critic_fit.py [--recipe ppo-critic-0-baseline] [--lrs 1e-5,1e-4,1e-3] [--steps 30]
                               [--set KEY=VALUE ...] [--out runs/critic-fit]

Prints a table (medians of the explained variances and the mean value loss over the second half
of the steps) and writes ``critic_fit.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _mean(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def _median(values):
    """The median: a step whose returns barely vary has an explained variance far below 0, which a mean
    over steps would be dominated by."""
    values = sorted(v for v in values if isinstance(v, (int, float)))
    return values[len(values) // 2] if values else None


def measure(recipe: str, lr: float, steps: int, extra: list[str], out: Path) -> dict:
    run_dir = out / f"lr-{lr:g}"
    if not (run_dir / "summary.json").is_file():
        command = [sys.executable, "-m", "posttrain.cli", "run", recipe, "--output-dir", str(run_dir), "--overwrite",
                   "--set", "training.learning_rate=0.0", "--set", f"plugins.critic.learning_rate={lr}",
                   "--set", f"training.max_steps={steps}", "--set", "eval.generate=0", "--set", "eval.before=false",
                   "--set", "training.save_steps=100000"]
        for item in extra:
            command += ["--set", item]
        subprocess.run(command, check=True)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    lines = [line for line in lines if "critic/value_loss" in line]
    second = lines[len(lines) // 2:]
    return {
        "learning_rate": lr, "steps": len(lines),
        "explained_variance": _median(line.get("critic/explained_variance") for line in second),
        "explained_variance_last": _median(line.get("critic/explained_variance_last") for line in second),
        "value_loss": _mean(line.get("critic/value_loss") for line in second),
        "first_explained_variance": _median(line.get("critic/explained_variance") for line in lines[1:4]),
        "returns_mean": _mean(line.get("critic/returns_mean") for line in second),
        "values_mean": _mean(line.get("critic/values_mean") for line in second),
        "curve": [{k: line.get(k) for k in ("step", "critic/explained_variance", "critic/value_loss",
                                             "critic/values_mean", "critic/returns_mean")} for line in lines],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="ppo-critic-0-baseline")
    parser.add_argument("--lrs", default="1e-5,1e-4,1e-3")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="runs/critic-fit")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [measure(args.recipe, float(lr), args.steps, args.set, out) for lr in args.lrs.split(",")]
    (out / "critic_fit.json").write_text(json.dumps({"recipe": args.recipe, "set": args.set, "rows": rows}, indent=2))
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"{'critic lr':>10} {'EV (2nd half)':>14} {'EV last token':>14} {'EV steps 2-4':>13} {'value loss':>11} "
          f"{'mean V':>8} {'mean G':>8}")
    for r in rows:
        print(f"{r['learning_rate']:>10g} {fmt(r['explained_variance']):>14} {fmt(r['explained_variance_last']):>14} "
              f"{fmt(r['first_explained_variance']):>13} {fmt(r['value_loss']):>11} {fmt(r['values_mean']):>8} "
              f"{fmt(r['returns_mean']):>8}")


if __name__ == "__main__":
    main()
