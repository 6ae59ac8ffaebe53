"""Why PPO on a learned reward model does (or does not) improve a policy: the four usual suspects measured on
one finished run of a pipeline with a ``reward_model`` stage and a PPO (``online``) stage that uses it.

1. The reward model on the policy's own answers: several answers to each held-out prompt are sampled from
   the PPO stage's start and from its end, scored by the reward model and by the task's rule judges
   (``safety``, ``helpful``), and the reward model's pairwise accuracy is counted over the pairs of one
   prompt's answers that the judge tells apart (the safe one should score higher; the helpful one
   should). Beside it, the reward model's held-out accuracy on the preference pairs it was trained on
   (its stage's summary).
2. The KL penalty: the mean KL term in the per-token reward over training (first and last third of
   the logged steps).
3. The critic's fit: its explained variance (all tokens and the last token) over training.
4. Length: the mean completion length and the share cut at the length limit over training, the mean
   length of the sampled answers (their text tokenised again) and its correlation with the reward model's
   score.

    python bench/ppo_diagnose.py RUN_DIR [--prompts 100] [--samples 4] [--max-new-tokens 32] [--seed 0]
    python bench/ppo_diagnose.py --training-only RUN_DIR [RUN_DIR ...]

RUN_DIR is a pipeline run (e.g. runs/saferlhf-table/saferlhf-6-ppo). Held-out prompts: the built-in
``safety_prompts`` with seed 99, as bench/saferlhf_table.py evaluates. Writes RUN_DIR/diagnosis.json and
prints it with a short Markdown table. ``--training-only`` skips the sampling (1 and the sampled part of
4; no model is loaded, a second or so a run): it reads the reward model's held-out accuracy and the
training log of each RUN_DIR (e.g. one PPO row over several seeds) and prints one table line per run,
writing nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from itertools import combinations
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

TRACKED = {"reward_model": "rewards/reward_model/mean", "safety": "rewards/safety/mean",
           "helpful": "rewards/helpful/mean", "kl_in_reward": "kl_in_reward",
           "explained_variance": "critic/explained_variance",
           "explained_variance_last": "critic/explained_variance_last",
           "length": "completions/mean_length", "clipped_ratio": "completions/clipped_ratio"}


def stages_of(run_dir: Path) -> tuple[dict, dict[str, Path]]:
    """The pipeline's recipe and its stage folders by stage name."""
    import yaml

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    from posttrain.compare import pipeline_stages

    folders = {p.name.split("-", 1)[1]: p for p in pipeline_stages(run_dir)}
    return recipe, folders


def find(recipe: dict, folders: dict[str, Path]) -> tuple[Path, Path, Path]:
    """(the PPO stage's folder, its start model folder, the reward model folder it scores with)."""
    online = [s for s in recipe["stages"] if s["stage"] == "online" and "reward_model" in (s.get("plugins") or {})]
    if not online:
        raise SystemExit("no online stage with a reward_model source in this run")
    stage = online[-1]
    names = [s["name"] for s in recipe["stages"]]
    start = (stage.get("model") or {}).get("name_or_path") or f"stages.{names[names.index(stage['name']) - 1]}"
    rm = stage["plugins"]["reward_model"]["model"]
    if not (start.startswith("stages.") and rm.startswith("stages.")):
        raise SystemExit("the PPO stage's start and reward model must be earlier stages of this run")
    return folders[stage["name"]], folders[start.split(".", 1)[1]] / "merged", folders[rm.split(".", 1)[1]] / "merged"


def thirds(entries: list[dict]) -> dict[str, dict]:
    """Each tracked metric's mean over the first and the last third of the logged training steps."""
    out = {}
    for name, key in TRACKED.items():
        values = [e[key] for e in entries if key in e]
        if not values:
            continue
        k = max(1, len(values) // 3)
        out[name] = {"first": statistics.fmean(values[:k]), "last": statistics.fmean(values[-k:]), "n": len(values)}
    return out


def pairwise_accuracy(groups: list[list[tuple[float, float]]]) -> dict:
    """Over every pair of one prompt's answers whose judge scores differ: the share the reward model orders
    as the judge does (ties of the reward model count half)."""
    right = total = 0.0
    for answers in groups:
        for (r1, j1), (r2, j2) in combinations(answers, 2):
            if j1 == j2:
                continue
            total += 1
            agree = (r1 - r2) * (j1 - j2)
            right += 1.0 if agree > 0 else 0.5 if r1 == r2 else 0.0
    return {"accuracy": right / total if total else None, "pairs": int(total)}


def sample_and_score(model_dir: Path, rm, rows: list[dict], samples: int, max_new_tokens: int, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import posttrain
    from posttrain.sampling import default_sample

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [r["prompt"] for r in rows]
    answers = default_sample(model, tokenizer, prompts, samples,
                             {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": 1.0})
    flat_prompts = [p for p, group in zip(prompts, answers) for _ in group]
    flat = [a for group in answers for a in group]
    columns = {k: [r[k] for r, group in zip(rows, answers) for _ in group]
               for k in ("safety_kind", "secret", "forbidden_action", "ground_truth")}
    reward = posttrain.score(rm, flat, prompts=flat_prompts)
    safe = posttrain.score("safety", flat, prompts=flat_prompts, **columns)
    helpful = posttrain.score("helpful", flat, prompts=flat_prompts, **columns)
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in flat]
    per_prompt = lambda judge: [list(zip(reward[i:i + samples], judge[i:i + samples]))  # noqa: E731
                                for i in range(0, len(flat), samples)]
    harmful = [i for i, k in enumerate(columns["safety_kind"]) if k != "benign"]
    benign = [i for i, k in enumerate(columns["safety_kind"]) if k == "benign"]
    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    return {
        "answers": len(flat), "safety_rate": mean(safe), "helpfulness": mean(helpful),
        "reward_model_mean": mean(reward), "length_mean": mean(lengths),
        "reward_model_by_kind": {"safe": mean([r for r, s in zip(reward, safe) if s]),
                                 "unsafe": mean([r for r, s in zip(reward, safe) if not s]),
                                 "benign answered": mean([reward[i] for i in benign if helpful[i]]),
                                 "benign refused": mean([reward[i] for i in benign if not helpful[i]]),
                                 "harmful refused": mean([reward[i] for i in harmful if helpful[i]])},
        "rm_vs_safety": pairwise_accuracy(per_prompt(safe)),
        "rm_vs_helpful": pairwise_accuracy(per_prompt(helpful)),
        "rm_length_correlation": statistics.correlation(reward, lengths) if len(set(lengths)) > 1 else None,
        "examples": [{"answer": flat[i], "reward_model": reward[i], "safe": safe[i], "helpful": helpful[i]}
                     for i in (benign[::samples][:2] + harmful[::samples][:2])],  # one answer per prompt
    }


def markdown(d: dict) -> str:
    def f(v, pct=False):
        return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.3f}")

    lines = ["| policy | safety rate | helpfulness | RM score | RM vs safety judge | RM vs helpful judge | "
             "length |", "|---|---|---|---|---|---|---|"]
    for name in ("start", "end"):
        s = d["samples"][name]
        lines.append(f"| {name} | {f(s['safety_rate'], True)} | {f(s['helpfulness'], True)} | "
                     f"{f(s['reward_model_mean'])} | {f(s['rm_vs_safety']['accuracy'], True)} "
                     f"({s['rm_vs_safety']['pairs']} pairs) | {f(s['rm_vs_helpful']['accuracy'], True)} "
                     f"({s['rm_vs_helpful']['pairs']} pairs) | {f(s['length_mean'])} |")
    lines += ["", "| training (first → last third) | " + " | ".join(d["training"]) + " |",
              "|---|" + "---|" * len(d["training"]),
              "| | " + " | ".join(f"{f(v['first'])} → {f(v['last'])}" for v in d["training"].values()) + " |",
              "", f"Reward model's held-out pairwise accuracy on its own pairs: {f(d['rm_heldout_accuracy'])}"]
    return "\n".join(lines)


def training_report(run_dir: Path) -> dict:
    """What the finished run's files say without loading a model: its stages, the reward model's held-out
    accuracy on its own pairs and the PPO stage's training log by thirds."""
    recipe, folders = stages_of(run_dir)
    ppo_dir, start_dir, rm_dir = find(recipe, folders)
    entries = [json.loads(x) for x in (ppo_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    entries = [e for e in entries if "train_runtime" not in e]
    rm_summary = json.loads((rm_dir.parent / "summary.json").read_text())
    return {
        "run": str(run_dir), "ppo_stage": ppo_dir.name, "start": str(start_dir), "reward_model": str(rm_dir),
        "rm_heldout_accuracy": ((rm_summary.get("after") or {}).get("heldout") or {}).get("pairwise_accuracy"),
        "training": thirds(entries),
    }


def training_markdown(reports: list[dict]) -> str:
    """One line per run: the reward model's held-out accuracy and each tracked metric, first → last third."""
    names = [n for n in TRACKED if any(n in r["training"] for r in reports)]
    lines = ["| run | RM held-out accuracy | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in reports:
        acc = r["rm_heldout_accuracy"]
        cells = [f"{r['training'][n]['first']:.3f} → {r['training'][n]['last']:.3f}" if n in r["training"] else "-"
                 for n in names]
        lines.append(f"| {r['run']} | {'-' if acc is None else f'{100 * acc:.1f}%'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="+")
    parser.add_argument("--training-only", action="store_true",
                        help="read the reward model's summary and the training log only (no sampling; any number of runs)")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.training_only:
        reports = [training_report(Path(d)) for d in args.run_dir]
        print(json.dumps(reports, indent=2))
        print(training_markdown(reports))
        return 0
    if len(args.run_dir) > 1:
        parser.error("sampling diagnoses one run at a time; give one RUN_DIR, or add --training-only")
    from posttrain.builtin.safety import SafetyPromptOptions, safety_prompts
    from posttrain.rewards import load_plugin

    run_dir = Path(args.run_dir[0])
    report = training_report(run_dir)
    rm = load_plugin("reward_model", model=report["reward_model"])
    rows = safety_prompts(SafetyPromptOptions(n=args.prompts, seed=99))
    start_dir, ppo_dir = Path(report["start"]), run_dir / report["ppo_stage"]
    report["samples"] = {name: sample_and_score(model_dir, rm, rows, args.samples, args.max_new_tokens, args.seed)
                         for name, model_dir in (("start", start_dir), ("end", ppo_dir / "merged"))}
    report["settings"] = {"prompts": args.prompts, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
                          "seed": args.seed, "heldout": {"generator": "safety_prompts", "seed": 99}}
    (run_dir / "diagnosis.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
