"""bench/ood.py on the tiny model: the sft -> dpo / rm -> ppo pipeline runs with real stages, and every
checkpoint of both methods is scored. A random model's probabilities mean nothing; what is checked is the
data (pairs never show y3), the token accounting of an answer, that both curves start at the same model
and that training moved them, and the summary against the curves."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark scripts

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import ood  # noqa: E402


def test_the_pairs_never_show_the_third_answer(tmp_path):
    paths = ood.write_data(tmp_path)
    pairs = [json.loads(x) for x in paths["pairs"].read_text().splitlines()]
    sft = [json.loads(x) for x in paths["sft"].read_text().splitlines()]
    unseen = {y3 for _, _, _, y3 in ood.GROUPS}
    shown = {p[k][0]["content"] for p in pairs for k in ("chosen", "rejected")}
    assert len(pairs) == 48 and not shown & unseen
    assert {r["completion"][0]["content"] for r in sft} == shown | unseen and len(sft) == 3 * 48


def test_an_answer_is_scored_through_its_end_of_turn_token(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = ood.prompts()[0]
    head, tail = ood.answer_tokens(tokenizer, row["prompt"], row["y3"])
    assert tail[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in tail[:-1]
    assert tokenizer.decode(tail[:-1]).strip() == row["y3"]


def test_dpo_and_ppo_from_one_start_are_scored_at_every_checkpoint(tiny_model_dir, tmp_path):
    command = [sys.executable, str(REPO / "bench" / "ood.py"), "--out", str(tmp_path / "ood"), "--seeds", "3",
               "--steps", "2", "--every", "1", "--set", f"model.name_or_path={tiny_model_dir}",
               "--set", "stages.sft.training.max_steps=2", "--set", "stages.rm.training.max_steps=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "ood" / "ood.json").read_text())
    curves = report["seeds"]["3"]["curves"]
    for method in ("dpo", "ppo"):
        assert [p["step"] for p in curves[method]] == [0, 1, 2]
        for point in curves[method]:
            assert all(0.0 <= point[k] <= 1.0 for k in ood.ANSWERS)
            assert abs(sum(point[k] for k in (*ood.ANSWERS, "other")) - 1.0) < 1e-9
    assert curves["dpo"][0] == curves["ppo"][0]  # the same start
    assert curves["dpo"][-1]["y1"] != curves["dpo"][0]["y1"] and curves["ppo"][-1]["y1"] != curves["ppo"][0]["y1"]
    run = Path(report["seeds"]["3"]["run"])
    assert json.loads((run / "summary.json").read_text())["stages"][1]["stage"] == "preference"
    summary = report["summary"]
    assert summary["ppo.end"]["unseen"]["mean"] == curves["ppo"][-1]["y3"] + curves["ppo"][-1]["other"]
    assert summary["dpo.end"]["y1"]["values"] == [curves["dpo"][-1]["y1"]]
    assert set(summary["rm"]) == set(ood.ANSWERS) and statistics.fmean(summary["rm"]["y1"]["values"]) == \
        report["seeds"]["3"]["reward"]["y1"]
    assert "| DPO, last checkpoint |" in (tmp_path / "ood" / "ood.md").read_text()


def test_batched_answer_probabilities_equal_one_sequence_at_a_time(tiny_model_dir):
    """The padded batches give each answer the probability a lone forward pass gives it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = ood.prompts()[::16]
    batched = ood.answer_probabilities(model, tokenizer, rows, batch_size=4)
    alone = dict.fromkeys(ood.ANSWERS, 0.0)
    with torch.no_grad():
        for row in rows:
            for name in ood.ANSWERS:
                head, tail = ood.answer_tokens(tokenizer, row["prompt"], row[name])
                logits = model(input_ids=torch.tensor([head + tail])).logits[0]
                logp = torch.log_softmax(logits.float(), -1)
                alone[name] += float(sum(logp[len(head) - 1 + k, t] for k, t in enumerate(tail)).exp()) / len(rows)
    for name in ood.ANSWERS:
        assert batched[name] == pytest.approx(alone[name], rel=1e-4, abs=1e-12)
