"""The DPO-vs-PPO study's out-of-distribution argument as an experiment: preference pairs that cover only
some of the possible answers (y1 preferred to y2, y3 never shown), trained with DPO and with a reward
model + PPO from the same start, and the probability each policy puts on every answer over training.

The task: 48 prompts in three groups (a colour, an animal, a number word for some object), each group with
three answers, y1 ≻ y2 and an unseen y3 (red ≻ blue, green unseen; cat ≻ dog, bird unseen; seven ≻ three,
five unseen). The start is an SFT stage on all three answers of every prompt, so the starting policy (the
reference of both methods) gives each answer about a third. Then, from that start, per seed:

- ``dpo``: a preference stage (DPO, β 0.1) on the 48 pairs (y1, y2);
- ``rm`` + ``ppo``: a reward model (Bradley-Terry) on the same pairs, then PPO on the same prompts with the
  reward model as the reward (normalised by its held-out statistics), a critic initialised from it, GAE
  and the KL penalty in the per-token reward (β 0.05): the study's PPO.

Every checkpoint of both methods (every ``--every`` steps) is scored on the 48 prompts: the mean sequence
probability of y1, y2 and y3 (each answer up to and including the end-of-turn token, the chat template
as the stages render it), and of everything else (1 minus their sum). The reward model's scores of the
three answers (read as the PPO stage's ``reward_model`` source reads them) show what PPO is optimising
for y3, which no pair showed it.

    python bench/ood.py [--out runs/ood] [--seeds 0,1,2] [--steps 40] [--every 5]
                        [--set KEY=VALUE ...]   (recipe overrides, e.g. model.name_or_path=PATH)

``make table-ood`` runs it with the defaults. Writes ``OUT/ood.json`` (every curve, the reward model's
scores, each seed's run folder) and ``OUT/ood.md`` (the start and the last checkpoint of each method, mean ±
standard deviation over the seeds, and the curves); runs that finished are not run again, and a seed's
scores are kept in its run folder (ood-scores.json) and not computed again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# (question template, y1 preferred, y2 dispreferred, y3 never in a pair); the prompt lists the three
# answers in a per-prompt order so that no position is preferred
GROUPS = [
    ("What colour should the {thing} be? Answer with one word: {options}.", "red", "blue", "green"),
    ("Which animal should guard the {thing}? Answer with one word: {options}.", "cat", "dog", "bird"),
    ("How many {thing}s should there be? Answer with one word: {options}.", "seven", "three", "five"),
]
THINGS = ["door", "kite", "boat", "lamp", "chair", "mug", "scarf", "tent", "bike", "box", "cup", "flag",
          "hat", "sign", "bag", "wall"]
ANSWERS = ("y1", "y2", "y3")


def prompts() -> list[dict]:
    """Every prompt with its three answers."""
    import random

    rng = random.Random(0)
    rows = []
    for template, *answers in GROUPS:
        for thing in THINGS:
            order = list(answers)
            rng.shuffle(order)
            question = template.format(thing=thing, options=", ".join(order[:2]) + " or " + order[2])
            rows.append({"prompt": [{"role": "user", "content": question}],
                         **{name: answer for name, answer in zip(ANSWERS, answers)}})
    return rows


def write_data(folder: Path) -> dict[str, Path]:
    """sft.jsonl (every prompt with each of its three answers), pairs.jsonl (y1 chosen, y2 rejected) and
    prompts.jsonl (the prompts, for PPO)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = prompts()

    def reply(text):
        return [{"role": "assistant", "content": text}]

    files = {
        "sft": [{"prompt": r["prompt"], "completion": reply(r[name])} for r in rows for name in ANSWERS],
        "pairs": [{"prompt": r["prompt"], "chosen": reply(r["y1"]), "rejected": reply(r["y2"])} for r in rows],
        "prompts": [{"prompt": r["prompt"]} for r in rows],
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(x) + "\n" for x in data), encoding="utf-8")
    return paths


def recipe(paths: dict[str, Path], steps: int, every: int) -> dict:
    """The pipeline: sft (the start), dpo from it, rm from it, ppo from it."""
    lora = {"r": 16, "alpha": 32, "dropout": 0.0}
    common = {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "logging_steps": 5,
              "save_total_limit": None}

    def data(name):
        return {"source": str(paths[name]), "eval": {"source": str(paths[name]), "max_examples": 8}}

    no_eval = {"before": False, "generate": 0}
    return {
        "name": "ood-dpo-vs-ppo",
        "description": "DPO and reward model + PPO on pairs that never show y3 (bench/ood.py)",
        "seed": 0,
        "model": {"name_or_path": "builtin:smollm2-135m-instruct", "lora": lora},
        "stages": [
            {"name": "sft", "stage": "sft", "data": data("sft"), "plugins": {}, "eval": no_eval,
             "training": {**common, "learning_rate": 5e-4, "max_steps": 36, "warmup_steps": 3,
                          "save_steps": 1000, "max_length": 128}},
            {"name": "dpo", "stage": "preference", "model": {"name_or_path": "stages.sft"}, "data": data("pairs"),
             "plugins": {"dpo": {"beta": 0.1}}, "eval": no_eval,
             "training": {**common, "learning_rate": 2e-4, "max_steps": steps, "save_steps": every,
                          "max_length": 128}},
            {"name": "rm", "stage": "reward_model", "model": {"name_or_path": "stages.sft"}, "data": data("pairs"),
             "plugins": {}, "training": {**common, "learning_rate": 1e-3, "max_steps": 30, "warmup_steps": 3,
                                         "save_steps": 1000, "max_length": 128}},
            {"name": "ppo", "stage": "online", "model": {"name_or_path": "stages.sft"}, "data": data("prompts"),
             "plugins": {"reward_model": {"model": "stages.rm", "normalize": "heldout"},
                         "critic": {"model": "stages.rm", "normalize": "heldout", "lora_r": 16,
                                    "learning_rate": 1e-4},
                         "gae": {"gamma": 1.0, "lam": 0.95, "kl": "reward"},
                         "advantage_norm": {"scope": "batch"}, "large_batch": {"prompts_per_update": 4}},
             "eval": no_eval,
             "training": {"learning_rate": 2e-4, "beta": 0.05, "num_generations": 4,
                          "per_device_train_batch_size": 8, "max_completion_length": 6, "temperature": 1.0,
                          "max_steps": steps, "save_steps": every, "logging_steps": 5, "save_total_limit": None}},
        ],
    }


def answer_tokens(tokenizer, prompt: list[dict], answer: str) -> tuple[list[int], list[int]]:
    """The prompt's tokens (with the generation prompt) and the answer's, through its end-of-turn token, as
    the chat template renders the conversation."""
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    whole = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True)
    head, whole = [int(t) for t in _ids(head)], [int(t) for t in _ids(whole)]
    assert whole[:len(head)] == head, "the chat template does not extend the prompt"
    tail = whole[len(head):]
    eos = tokenizer.eos_token_id
    return head, tail[:tail.index(eos) + 1] if eos in tail else tail + [eos]


def _ids(encoded):
    """apply_chat_template's token ids, whether it returns them or an encoding holding them."""
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded


def answer_probabilities(model, tokenizer, rows: list[dict], batch_size: int = 48) -> dict[str, float]:
    """The mean over prompts of each answer's sequence probability, and of everything else (sequences padded on
    the right in batches: a causal model's real tokens keep their positions)."""
    import torch

    items = [(name, *answer_tokens(tokenizer, row["prompt"], row[name])) for row in rows for name in ANSWERS]
    sums = dict.fromkeys(ANSWERS, 0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            width = max(len(head) + len(tail) for _, head, tail in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (_, head, tail) in enumerate(chunk):
                ids[i, :len(head) + len(tail)] = torch.tensor(head + tail)
                mask[i, :len(head) + len(tail)] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            for i, (name, head, tail) in enumerate(chunk):
                positions = torch.arange(len(head) - 1, len(head) + len(tail) - 1)
                sums[name] += float(logp[i, positions, torch.tensor(tail)].sum().exp())
    out = {name: sums[name] / len(rows) for name in ANSWERS}
    out["other"] = 1.0 - sum(out.values())
    return out


def reward_scores(rm_dir: Path, rows: list[dict]) -> dict[str, float]:
    """The reward model's mean raw score of each answer, read as the PPO stage's reward_model source reads it."""
    import posttrain
    from posttrain.rewards import load_plugin

    source = load_plugin("reward_model", model=str(rm_dir))
    out = {}
    for name in ANSWERS:
        scores = posttrain.score(source, [r[name] for r in rows], prompts=[r["prompt"] for r in rows])
        out[name] = sum(scores) / len(scores)
    return out


def checkpoints(stage_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of a stage's complete checkpoints, in step order."""
    from posttrain.checkpoints import PREFIX, step_of, why_incomplete

    return sorted((step_of(p), p) for p in stage_dir.glob(f"{PREFIX}*")
                  if step_of(p) >= 0 and why_incomplete(p) is None)


def curves(base_dir: Path, stages: dict[str, Path], rows: list[dict]) -> dict[str, list[dict]]:
    """Per stage trained from ``base_dir``: the answer probabilities of the start (step 0, scored once and
    shared) and of every checkpoint."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    def point(step: int, adapter: Path | None) -> dict:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter)
        return {"step": step, **answer_probabilities(model.eval(), tokenizer, rows)}

    start = point(0, None)
    return {name: [start, *(point(step, folder) for step, folder in checkpoints(stage_dir))]
            for name, stage_dir in stages.items()}


def stage_dirs(run_dir: Path) -> dict[str, Path]:
    from posttrain.compare import pipeline_stages

    return {p.name.split("-", 1)[1]: p for p in pipeline_stages(run_dir)}


def summarise(seeds: dict[int, dict]) -> dict:
    """Per method: the start and the last checkpoint's probabilities, mean and sd over the seeds; the reward
    model's scores likewise."""
    def spread(values):
        return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values}

    out = {}
    for method in ("dpo", "ppo"):
        for at, index in (("start", 0), ("end", -1)):
            out[f"{method}.{at}"] = {key: spread([s["curves"][method][index][key] for s in seeds.values()])
                                     for key in (*ANSWERS, "other")}
            out[f"{method}.{at}"]["unseen"] = spread([s["curves"][method][index]["y3"]
                                                      + s["curves"][method][index]["other"] for s in seeds.values()])
    out["rm"] = {key: spread([s["reward"][key] for s in seeds.values()]) for key in ANSWERS}
    return out


def markdown(summary: dict, seeds: dict[int, dict]) -> str:
    def cell(v):
        return f"{v['mean']:.3f} ± {v['sd']:.3f}" if len(v["values"]) > 1 else f"{v['mean']:.3f}"

    lines = ["| policy | P(y1) | P(y2) | P(y3), unseen | P(anything else) | P(unseen) = y3 + else |",
             "|---|---|---|---|---|---|"]
    names = {"dpo.start": "start (SFT on y1, y2, y3)", "dpo.end": "DPO, last checkpoint",
             "ppo.end": "reward model + PPO, last checkpoint"}
    for key, label in names.items():
        v = summary[key]
        lines.append(f"| {label} | " + " | ".join(cell(v[k]) for k in (*ANSWERS, "other", "unseen")) + " |")
    rm = summary["rm"]
    lines += ["", "Reward model's mean raw score: " + ", ".join(f"{k} {cell(rm[k])}" for k in ANSWERS), "",
              "Curves (step: P(y1) / P(y2) / P(y3) / P(else)), every seed:", ""]
    for seed, result in seeds.items():
        for method in ("dpo", "ppo"):
            points = "; ".join(f"{p['step']}: {p['y1']:.2f}/{p['y2']:.2f}/{p['y3']:.2f}/{p['other']:.2f}"
                               for p in result["curves"][method])
            lines.append(f"- seed {seed}, {method}: {points}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ood", help="folder of the runs and the results")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (one pipeline per seed)")
    parser.add_argument("--steps", type=int, default=40, help="DPO and PPO steps")
    parser.add_argument("--every", type=int, default=5, help="a checkpoint (a point of the curves) every this many steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override (as posttrain run --set)")
    args = parser.parse_args(argv)
    import yaml

    from posttrain.runner import run

    out = Path(args.out)
    paths = write_data(out / "data")
    recipe_path = out / "ood-recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe(paths, args.steps, args.every), sort_keys=False), encoding="utf-8")
    rows = prompts()
    started = time.time()
    results: dict[int, dict] = {}
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        run_dir = out / f"seed-{seed}"
        if not (run_dir / "summary.json").is_file():
            run(str(recipe_path), [*args.set, f"seed={seed}"], str(run_dir), resume=(run_dir / "recipe.yaml").is_file())
        scored = run_dir / "ood-scores.json"
        if scored.is_file():
            results[seed] = json.loads(scored.read_text())
        else:
            stages = stage_dirs(run_dir)
            start = stages["sft"] / "merged"
            results[seed] = {"run": str(run_dir),
                             "curves": curves(start, {m: stages[m] for m in ("dpo", "ppo")}, rows),
                             "reward": reward_scores(stages["rm"] / "merged", rows)}
            scored.write_text(json.dumps(results[seed], indent=2))
        print(f"[ood] seed {seed}: dpo end {results[seed]['curves']['dpo'][-1]}, ppo end "
              f"{results[seed]['curves']['ppo'][-1]}", file=sys.stderr)
    summary = summarise(results)
    report = {"seeds": results, "summary": summary, "prompts": len(rows), "groups": GROUPS,
              "seconds": round(time.time() - started, 1)}
    text = markdown(summary, results)
    (out / "ood.json").write_text(json.dumps(report, indent=2))
    (out / "ood.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
