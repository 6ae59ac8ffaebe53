"""Iterative DPO (rounds of sampling, scoring, pairing, DPO, reference update) and rejection
sampling, on the tiny random Llama: pairs from hand-checked scores, the reference after a
ref_to_latest round, kill in round 2 and resume, a round without pairs, a reward model and a rule
labelling by weight, two processes sharing a round's prompts, and rejection sampling feeding an sft
stage of the same pipeline."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import device_batch, read_jsonl

from posttrain.plugin_set import PluginSet
from posttrain.trainers.iterative import select_pairs
from posttrain.trainers.rejection_sampling import distribution, keep_best

TESTS = Path(__file__).resolve().parent


def _plan(plugins):
    from types import SimpleNamespace

    return SimpleNamespace(plugins=plugins)


def _scored(*rewards):
    return [{"row": {"prompt": f"p{i}", "ground_truth": str(i)}, "completions": [f"c{i}{j}" for j in range(len(r))],
             "rewards": list(r), "by_source": {}} for i, r in enumerate(rewards)]


def test_pairs_from_hand_checked_scores():
    from posttrain.plugins.best_vs_worst import BestVsWorst
    from posttrain.plugins.random_pair import RandomPair

    scored = _scored([0.1, 0.9, 0.5, 0.9], [None, None], [None, 0.3, None], [0.4, 0.4, 0.4], [1.0, None, 0.0, 0.5])
    pairs, counts = select_pairs(_plan(PluginSet([])), scored)  # no owner: best against worst
    assert counts == {"prompts": 5, "pairs": 2, "dropped_all_abstained": 1, "dropped_one_scored": 1,
                      "dropped_tie": 1, "dropped_by_selection": 0}
    assert [(p["chosen"], p["rejected"], p["chosen_reward"], p["rejected_reward"]) for p in pairs] == [
        ("c01", "c00", 0.9, 0.1), ("c40", "c42", 1.0, 0.0)]  # the first best on a tie; abstained samples skipped
    assert pairs[0]["ground_truth"] == "0"  # the prompt's columns travel with its pair
    pairs, counts = select_pairs(_plan(PluginSet([BestVsWorst(BestVsWorst.Options(min_gap=0.85))])), scored)
    assert [p["prompt"] for p in pairs] == ["p4"] and counts["dropped_by_selection"] == 1
    random_pairs, _ = select_pairs(_plan(PluginSet([RandomPair(RandomPair.Options(min_gap=0.35, seed=3))])), scored)
    for p in random_pairs:
        assert p["chosen_reward"] - p["rejected_reward"] > 0.35


def test_best_of_n_dataset_by_hand():
    records, counts = keep_best(_scored([0.2, 0.7, None], [None], [0.1, 0.05]), min_score=0.15)
    assert [(r["prompt"], r["completion"], r["reward"]) for r in records] == [("p0", "c01", 0.7)]
    assert counts == {"prompts": 3, "kept": 1, "dropped_all_abstained": 1, "dropped_below_min_score": 1}
    assert distribution([1.0, 2.0, 3.0])["median"] == 2.0 and distribution([])is None


def _recipe(tiny_model_dir, tmp_path, name="it", plugins=None, **extra):
    data = {"stage": "iterative", "seed": 3, "name": name,
            "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                      "dtype": "float32"},
            "data": {"source": "builtin:word_problems", "options": {"n": 40}, "eval": {"fraction": 0.2}},
            "plugins": plugins or {"dpo": {"beta": 0.1}, "online_plugins:DigitShare": {}, "ref_to_latest": {}},
            # two sampling batches per round: round 2 samples with the trainer's (single-use) autocast per batch
            "rounds": 2, "sampling": {"samples": 4, "prompts": 8, "max_new_tokens": 8, "batch_size": 4},
            "training": {"per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1, "learning_rate": 5e-3,
                         "save_strategy": "steps", "save_steps": 1, "max_length": 512},
            "eval": {"generate": 4, "max_new_tokens": 6}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.slow
def test_iterative_rounds_write_their_data_and_move_the_reference(cli, tiny_model_dir, tmp_path):
    from posttrain.pipeline import load_recipe
    from posttrain.trainers.iterative import Rounds
    from posttrain.validate import validate

    run = tmp_path / "run"
    recipe = _recipe(tiny_model_dir, tmp_path)
    code, out, err = cli("run", recipe, "--output-dir", run)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for r in (1, 2):
        folder = run / f"round-{r:02d}"
        samples, pairs = read_jsonl(folder / "samples.jsonl"), read_jsonl(folder / "pairs.jsonl")
        info = json.loads((folder / "round.json").read_text())
        assert len(samples) == 8 and all(len(s["completions"]) == 4 for s in samples)
        assert info["pairs"] == len(pairs) > 0 and info["global_step"] == 2
        for p in pairs:  # every pair is its prompt's best and worst sample
            sample = next(s for s in samples if s["prompt"] == p["prompt"])
            assert p["chosen_reward"] == max(sample["rewards"]) and p["rejected_reward"] == min(sample["rewards"])
        assert (folder / "final" / "ref" / "adapter_model.safetensors").is_file()
    assert read_jsonl(run / "round-01" / "samples.jsonl") != read_jsonl(run / "round-02" / "samples.jsonl")
    assert {r["round"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r} == {1, 2}
    assert summary["before"]["answers"]["n"] == 4 and summary["after"]["answers"]["n"] == 4
    # after a ref_to_latest round, the reference log-probs are the policy's
    state = Rounds(validate(load_recipe(recipe)), tmp_path / "probe")
    state.restore(run / "round-01")
    trainer = state.build_trainer(read_jsonl(run / "round-02" / "pairs.jsonl"))
    batch = device_batch(trainer, 4)
    trainer.model.eval()
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    with torch.no_grad():
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        policy = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                               fused_lm_head=True).log_probs
        with trainer.model.disable_adapter():
            base = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                                 fused_lm_head=True).log_probs
    mask = batch["completion_mask"][:, 1:]
    policy, base = (policy * mask).sum(1), (base * mask).sum(1)
    assert torch.allclose(torch.cat([ref_chosen, ref_rejected]), policy, atol=1e-5)
    assert not torch.allclose(policy, base, atol=1e-3)  # the round did train the policy


def test_without_a_reference_update_the_reference_stays_the_start(tiny_model_dir, tmp_path):
    from posttrain.pipeline import load_recipe
    from posttrain.trainers.iterative import Rounds
    from posttrain.validate import validate

    plan = validate(load_recipe(_recipe(tiny_model_dir, tmp_path, plugins={"dpo": {}, "online_plugins:DigitShare": {}})))
    state = Rounds(plan, tmp_path / "run")
    rows = [state.train[i] for i in range(4)]
    pairs = [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": "12"}],
              "rejected": [{"role": "assistant", "content": "ab"}]} for r in rows]
    trainer = state.build_trainer(pairs)
    assert "ref" not in trainer.model.peft_config  # the reference is the adapter-disabled start, π0


@pytest.mark.slow
def test_killed_in_round_two_resumes_without_repeating_round_one(tiny_model_dir, tmp_path):
    marker = tmp_path / "killed.marker"
    training = {"per_device_train_batch_size": 4, "max_steps": 3, "logging_steps": 1, "learning_rate": 5e-3,
                "save_strategy": "steps", "save_steps": 1, "max_length": 512}
    recipe = _recipe(tiny_model_dir, tmp_path, training=training, plugins={
        "dpo": {}, "online_plugins:DigitShare": {}, "ref_to_latest": {},
        "online_plugins:KillInRound": {"round": 2, "at_step": 2, "marker": str(marker)}})
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--output-dir", str(run)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert (run / "round-01" / "round.json").is_file() and not (run / "round-02" / "round.json").exists()
    assert (run / "round-02" / "pairs.jsonl").is_file() and (run / "round-02" / "checkpoint-1").is_dir()
    round1 = {p: p.stat().st_mtime_ns for p in (run / "round-01").rglob("*") if p.is_file()}
    pairs2 = (run / "round-02" / "pairs.jsonl").read_text()
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "round 1 finished earlier" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (run / "round-01").rglob("*") if p.is_file()} == round1
    assert (run / "round-02" / "pairs.jsonl").read_text() == pairs2  # round 2 was not sampled again
    info = json.loads((run / "round-02" / "round.json").read_text())
    assert info["global_step"] == 3
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r and r["round"] == 2] == [1, 2, 3]
    assert [r["round"] for r in json.loads((run / "summary.json").read_text())["rounds"]] == [1, 2]


@pytest.mark.slow
def test_a_reward_model_and_a_verifier_label_the_samples_by_weight(cli, tiny_model_dir, tmp_path):
    """Round 1's stored rewards are the weighted sum of the sources, each recomputed here on its own:
    the reward model by a direct RewardModel call (normalised by its reward_stats.json), the
    digit-share rule by hand."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.plugins.reward_model import RewardModel
    from posttrain.types import completion_text

    rm = tmp_path / "rm"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(rm), tokenizer.save_pretrained(rm)
    (rm / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0}))
    plugins = {"dpo": {}, "reward_model": {"model": str(rm), "normalize": "heldout", "weight": 0.5, "dtype": "float32"},
               "online_plugins:DigitShare": {}}
    run = tmp_path / "run"
    code, _, err = cli("run", _recipe(tiny_model_dir, tmp_path, plugins=plugins, rounds=1), "--output-dir", run)
    assert code == 0, err
    samples = read_jsonl(run / "round-01" / "samples.jsonl")
    direct = RewardModel(RewardModel.parse_options({"model": str(rm), "normalize": "heldout", "dtype": "float32"},
                                                   where="plugins.reward_model"))
    for s in samples:
        rm_scores = direct.posttrain_reward(prompts=[s["prompt"]] * len(s["completions"]), completions=s["completions"])
        texts = [completion_text(c) for c in s["completions"]]
        digits = [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]
        assert s["by_source"]["reward_model"] == pytest.approx(rm_scores, abs=1e-4)
        assert s["by_source"]["digit_share"] == pytest.approx(digits, abs=1e-6)
        assert s["rewards"] == pytest.approx([0.5 * r + d for r, d in zip(rm_scores, digits)], abs=1e-4)


@pytest.mark.slow
def test_two_process_iterative_rounds(tiny_model_dir, tmp_path):
    """Two rounds under torchrun with two CPU processes (gloo): every prompt of a round is sampled
    and scored once, the round's files are written once, and both ranks train on the same pairs."""
    from conftest import cpu_processes_env, free_port

    run = tmp_path / "run"
    scored = tmp_path / "scored"
    recipe = _recipe(tiny_model_dir, tmp_path, plugins={"dpo": {"beta": 0.1}, "ref_to_latest": {},
                                                         "online_plugins:ScoredPerRank": {"folder": str(scored)}},
                     eval={"generate": 0})
    env = cpu_processes_env(PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", free_port(), "-m", "posttrain.cli", "run", str(recipe), "--output-dir", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from posttrain.pipeline import load_recipe
    from posttrain.trainers.iterative import Rounds
    from posttrain.trainers.rollouts import round_prompts, rows_of
    from posttrain.validate import validate

    plan = validate(load_recipe(recipe))
    train = rows_of(Rounds(plan, tmp_path / "probe").train)
    for r in (1, 2):
        folder = run / f"round-{r:02d}"
        samples, pairs = read_jsonl(folder / "samples.jsonl"), read_jsonl(folder / "pairs.jsonl")
        info = json.loads((folder / "round.json").read_text())
        # each process sampled every other prompt; the gathered list is the round's prompts in order
        assert [s["prompt"] for s in samples] == [row["prompt"] for row in round_prompts(train, plan.options.sampling,
                                                                                         r, plan.recipe.seed)]
        assert all(len(s["completions"]) == 4 and len(s["rewards"]) == 4 for s in samples)
        assert info["pairs"] == len(pairs) > 0 and info["global_step"] == 2
    # and it was shared: rank 0 scored the even-numbered prompts of each round, rank 1 the odd ones
    by_rank = [[json.loads(line) for line in (scored / f"rank-{k}.jsonl").read_text().splitlines()] for k in (0, 1)]
    rounds = [[s["prompt"] for s in read_jsonl(run / f"round-{r:02d}" / "samples.jsonl")] for r in (1, 2)]
    for k in (0, 1):
        assert by_rank[k] == [p for prompts in rounds for p in prompts[k::2] for _ in range(4)]
    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert proc.stdout.count("round 2:") == 1  # printed by rank 0 only


def test_a_round_without_pairs_is_a_clear_error(cli, tiny_model_dir, tmp_path):
    recipe = _recipe(tiny_model_dir, tmp_path, plugins={"dpo": {}, "online_plugins:Constant": {"value": 1.0}})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 2
    assert "round 1 kept no pair from 8 prompts (8 a tie)" in err and "samples.jsonl" in err


@pytest.mark.parametrize("key, value, message", [
    ("rounds", 0, "rounds: rounds must be at least 1"),
    ("sampling", {"samples": 1}, "sampling.samples: samples must be at least 2: a pair needs two samples"),
    ("sampling", {"min_score": 0.5}, "sampling.min_score: unknown option 'min_score' for the iterative stage"),
    ("training", {"precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
])
def test_iterative_recipe_errors(cli, tiny_model_dir, tmp_path, key, value, message):
    code, _, err = cli("validate", _recipe(tiny_model_dir, tmp_path, **{key: value}))
    assert code == 2 and message in err, err


def test_rounds_and_sampling_belong_to_their_stages(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(rounds=2))
    assert code == 2 and "rounds: 'rounds' is a key of the iterative stage, not of preference" in err
    code, _, err = cli("validate", write_recipe(plugins={"dpo": {}, "ref_to_latest": {}}))
    assert code == 2 and "plugins.ref_to_latest" in err


def _rejection_sampling_then_sft(tiny_model_dir, tmp_path, reward):
    stages = [
        {"name": "best-of-n", "stage": "rejection_sampling",
         "data": {"source": "builtin:word_problems", "options": {"n": 24}, "eval": {"fraction": 0.0}},
         "plugins": reward,
         "sampling": {"samples": 4, "prompts": 12, "max_new_tokens": 8, "min_score": 0.05}},
        {"name": "sft", "stage": "sft", "data": {"source": "stages.best-of-n", "eval": {"fraction": 0.25}},
         "plugins": {}, "training": {"per_device_train_batch_size": 4, "max_steps": 2, "save_strategy": "no",
                                     "max_length": 512}, "eval": {"generate": 0}},
    ]
    path = tmp_path / "rs.yaml"
    path.write_text(yaml.safe_dump({"name": "rs", "model": {"name_or_path": str(tiny_model_dir),
                                                            "lora": {"r": 8, "alpha": 16}}, "stages": stages}))
    return path


@pytest.mark.slow
def test_two_process_rejection_sampling_shares_the_prompts(tiny_model_dir, tmp_path):
    from conftest import cpu_processes_env, free_port

    scored = tmp_path / "scored"
    path = _rejection_sampling_then_sft(tiny_model_dir, tmp_path, {"online_plugins:ScoredPerRank": {"folder": str(scored)}})
    run = tmp_path / "run"
    env = cpu_processes_env(PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", free_port(), "-m", "posttrain.cli", "run", str(path), "--output-dir", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("rejection sampling kept") == 1
    prompts = [s["prompt"] for s in read_jsonl(run / "01-best-of-n" / "samples.jsonl")]
    assert len(prompts) == 12
    for k in (0, 1):
        lines = (scored / f"rank-{k}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == [p for p in prompts[k::2] for _ in range(4)]
    assert json.loads((run / "02-sft" / "summary.json").read_text())["global_step"] == 2


def test_rejection_sampling_feeds_an_sft_stage(cli, tiny_model_dir, tmp_path):
    path = _rejection_sampling_then_sft(tiny_model_dir, tmp_path, {"online_plugins:DigitShare": {}})
    run = tmp_path / "run"
    code, out, err = cli("run", path, "--output-dir", run)
    assert code == 0, err
    rs = json.loads((run / "01-best-of-n" / "summary.json").read_text())
    dataset = read_jsonl(run / "01-best-of-n" / "dataset.jsonl")
    samples = read_jsonl(run / "01-best-of-n" / "samples.jsonl")
    assert rs["prompts"] == 12 and rs["kept"] == len(dataset) > 0
    assert rs["kept"] + rs["dropped_all_abstained"] + rs["dropped_below_min_score"] == 12
    for record in dataset:  # each kept record is its prompt's best sample, at least min_score
        sample = next(s for s in samples if s["prompt"] == record["prompt"])
        assert record["reward"] == max(sample["rewards"]) >= 0.05
        assert record["completion"][0]["content"] in sample["completions"]
    sft = yaml.safe_load((run / "02-sft" / "recipe.yaml").read_text())
    assert sft["data"]["source"] == str((run / "01-best-of-n" / "dataset.jsonl").resolve())
    assert sft["model"]["name_or_path"] == str(tiny_model_dir)  # nothing trained: the same weights go on
    assert json.loads((run / "02-sft" / "summary.json").read_text())["global_step"] == 2
