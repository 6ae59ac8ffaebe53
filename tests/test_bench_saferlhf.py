"""bench/saferlhf_table.py on the tiny model: three rows (SFT, DPO, PPO) run end to end, then evaluated with the
safety task's judges, the later rows reusing the first row's SFT stage; bench/ppo_diagnose.py on the PPO row (sampling, and
the training log alone). The numbers of a random model mean nothing; what is checked is that the table holds the start
and the row's trained model with rates in range and example answers, the study's column beside them, and
that a second call reuses the finished run instead of training again (the same rates)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.slow  # the benchmark scripts

REPO = Path(__file__).resolve().parent.parent


def test_table_runs_a_row_and_evaluates_it(tiny_model_dir, tmp_path):
    import yaml

    sets = [f"model.name_or_path={tiny_model_dir}"]
    for stage in ("sft", "dpo", "rm", "ppo"):
        sets += [f"stages.{stage}.training.max_steps=2", f"stages.{stage}.data.options.n=40"]
        sets += [f"stages.{stage}.eval.generate=2"] if stage != "rm" else []
    command = [sys.executable, str(REPO / "bench" / "saferlhf_table.py"), "--out", str(tmp_path / "table"),
               "--prompts", "6", "--max-new-tokens", "6", "--rows", "0-sft,1-dpo,6-ppo",
               *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "table" / "table.json").read_text())
    start, sft, dpo, ppo = report["table"]
    assert sft["row"] == "SFT" and "1-dpo: its first 1 stage(s) are saferlhf-0-sft's (same recipe): reused" in proc.stderr
    shared = "01-sft/merged/model.safetensors"
    assert (Path(sft["run"]) / shared).stat().st_ino == (Path(dpo["run"]) / shared).stat().st_ino  # hard-linked
    assert start["row"].startswith("start (") and dpo["row"] == "DPO"
    assert dpo["run"].endswith("saferlhf-1-dpo") and (Path(dpo["run"]) / "02-dpo" / "merged").is_dir()
    assert ppo["row"] == "PPO" and [p.name for p in sorted(Path(ppo["run"]).glob("0*"))] == ["01-sft", "02-rm", "03-ppo"]
    assert report["heldout"] == {"generator": "safety_prompts", "n": 6, "seed": 99}
    for line in (start, sft, dpo, ppo):
        assert line["n"] == 6 and 0.0 <= line["safety_rate"] <= 1.0 and 0.0 <= line["helpfulness"] <= 1.0
        shown = line["examples"]
        assert shown and all(set(e) == {"prompt", "answer", "safe", "helpful"} for e in shown)
    md = (tmp_path / "table" / "table.md").read_text()
    assert "| DPO |" in md and "55.4%" in md and "| PPO |" in md and "99.5%" in md  # the study's column beside
    diagnose = subprocess.run([sys.executable, str(REPO / "bench" / "ppo_diagnose.py"), ppo["run"], "--prompts", "4",
                               "--samples", "3", "--max-new-tokens", "6"], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=900)
    assert diagnose.returncode == 0, diagnose.stderr[-4000:]
    diagnosis = json.loads((Path(ppo["run"]) / "diagnosis.json").read_text())
    assert diagnosis["ppo_stage"] == "03-ppo" and diagnosis["start"].endswith("01-sft/merged")
    assert diagnosis["reward_model"].endswith("02-rm/merged") and 0.0 <= diagnosis["rm_heldout_accuracy"] <= 1.0
    assert {"kl_in_reward", "explained_variance", "length", "reward_model"} <= set(diagnosis["training"])
    for name in ("start", "end"):
        assert diagnosis["samples"][name]["answers"] == 12 and diagnosis["samples"][name]["rm_vs_safety"]["pairs"] >= 0
    written = (Path(ppo["run"]) / "diagnosis.json").read_text()
    logs = subprocess.run([sys.executable, str(REPO / "bench" / "ppo_diagnose.py"), "--training-only", ppo["run"],
                           ppo["run"]], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert logs.returncode == 0, logs.stderr[-4000:]
    lines = [x for x in logs.stdout.splitlines() if x.startswith(f"| {ppo['run']} |")]
    assert len(lines) == 2 and "kl_in_reward" in logs.stdout and "→" in lines[0]  # one line per run, first → last
    assert (Path(ppo["run"]) / "diagnosis.json").read_text() == written  # the log-only pass writes nothing
    again = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert again.returncode == 0 and "1-dpo: finished earlier" in again.stderr
    assert json.loads((tmp_path / "table" / "table.json").read_text())["table"][2]["safety_rate"] == dpo["safety_rate"]
    # a variant of the PPO row that changes only its last stage, in another folder: the SFT and reward-model
    # stages come from the finished row (hard-linked), only PPO trains, and nothing in the first folder changes
    table_before = (tmp_path / "table" / "table.json").read_text()
    variant = subprocess.run([*command[:3], str(tmp_path / "variant"), *command[4:8], "--rows", "6-ppo",
                              "--reuse", str(tmp_path / "table"), *command[10:], "--set", "stages.ppo.training.beta=0.2"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert variant.returncode == 0, variant.stderr[-4000:]
    assert f"6-ppo: its first 2 stage(s) are {ppo['run']}'s (same recipe): reused" in variant.stderr
    varied = tmp_path / "variant" / "saferlhf-6-ppo"
    shared = "02-rm/merged/model.safetensors"
    assert (varied / shared).stat().st_ino == (Path(ppo["run"]) / shared).stat().st_ino
    assert (varied / "03-ppo" / "merged").is_dir()
    assert yaml.safe_load((varied / "recipe.yaml").read_text())["stages"][2]["training"]["beta"] == 0.2
    assert yaml.safe_load((varied / "03-ppo" / "recipe.yaml").read_text())["training"]["beta"] == 0.2
    assert (tmp_path / "table" / "table.json").read_text() == table_before


def test_seeds_train_each_row_once_per_seed_and_report_mean_and_spread(tiny_model_dir, tmp_path):
    import statistics

    import yaml

    sets = [f"model.name_or_path={tiny_model_dir}", "stages.sft.training.max_steps=2", "stages.sft.eval.generate=0",
            "stages.sft.training.logging_steps=1",
            "stages.sft.data.options.n=24"]
    command = [sys.executable, str(REPO / "bench" / "saferlhf_table.py"), "--out", str(tmp_path / "table"),
               "--prompts", "4", "--max-new-tokens", "4", "--rows", "0-sft", "--seeds", "0,1",
               *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = [tmp_path / "table" / f"seed-{s}" / "saferlhf-0-sft" for s in (0, 1)]
    assert [yaml.safe_load((r / "recipe.yaml").read_text())["seed"] for r in runs] == [0, 1]
    losses = [[json.loads(x)["loss"] for x in (r / "01-sft" / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in x] for r in runs]
    assert losses[0] != losses[1]  # the seed changed the training (LoRA initialisation, data order)
    report = json.loads((tmp_path / "table" / "table.json").read_text())
    assert report["seeds"] == [0, 1]
    start, *sft = report["table"]
    assert start["seed"] is None and [(x["row"], x["seed"]) for x in sft] == [("SFT", 0), ("SFT", 1)]
    row = next(r for r in report["by_row"] if r["row"] == "SFT")
    for key in ("safety_rate", "helpfulness", "benign_answered", "harmful_refused"):
        values = [x[key] for x in sft]
        assert row[key]["values"] == values and row[key]["mean"] == (values[0] + values[1]) / 2
        assert row[key]["sd"] == statistics.stdev(values) and row[key]["min"] == min(values)
    md = (tmp_path / "table" / "table.md").read_text()
    assert "| SFT | 0,1 |" in md and "| SFT (seed 1) |" in md and "41.6%" in md


def test_ppo_diagnosis_counts_the_reward_models_agreement_with_the_judges():
    """bench/ppo_diagnose.py's pairwise count, on hand-made groups: only pairs the judge tells apart count,
    a reward-model tie counts half."""
    sys.path.insert(0, str(REPO / "bench"))
    from ppo_diagnose import pairwise_accuracy, thirds

    groups = [[(0.9, 1.0), (0.1, 0.0), (0.5, 1.0)],   # pairs told apart: (0.9, 0.1) right, (0.1, 0.5) right
              [(0.2, 1.0), (0.7, 0.0)],               # wrong
              [(0.3, 1.0), (0.3, 0.0)],               # a tie: half
              [(0.4, 1.0), (0.8, 1.0)]]               # the judge ties: not counted
    assert pairwise_accuracy(groups) == {"accuracy": 2.5 / 4, "pairs": 4}
    entries = [{"kl_in_reward": float(i), "completions/mean_length": 10.0} for i in range(9)]
    assert thirds(entries)["kl_in_reward"] == {"first": 1.0, "last": 7.0, "n": 9}
