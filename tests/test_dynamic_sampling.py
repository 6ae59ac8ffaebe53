"""DAPO's dynamic sampling (`dynamic_sampling`) through the online stage's group-filter hook
(`posttrain_filter_groups`): the filter by hand, the batch assembled from rounds, runs in which dropped
groups are replaced by newly sampled ones (checked against every batch the reward source scored), and
the refusals at validate."""

from pathlib import Path

import online_plugins
import pytest
import torch
from conftest import GROUP_PLUS_NORM, read_jsonl

from posttrain.plugins.dynamic_sampling import signal_groups
from posttrain.trainers import refill

NAN = float("nan")


def test_a_group_is_kept_when_its_rewards_spread():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0],   # all right: no signal
                            [0.0, 0.0, 0.0, 0.0],   # all wrong: no signal
                            [1.0, 0.0, 0.0, 0.0],   # signal
                            [NAN, NAN, NAN, NAN],   # no source scored it
                            [1.0, NAN, NAN, NAN],   # one scored completion has no spread
                            [0.5, NAN, 0.7, 0.5]])  # spread among the scored ones
    assert signal_groups(rewards, 0.0) == [False, False, True, False, False, True]
    # population std of [1, 0, 0, 0] is sqrt(3)/4 = 0.433; of [0.5, 0.7, 0.5] it is 0.0943
    assert signal_groups(rewards, 0.2) == [False, False, True, False, False, False]


def test_each_process_trains_on_the_kept_groups_of_the_rounds_in_order():
    # two processes of two groups each; round 0 keeps global groups 1 and 2, round 1 keeps 0 and 3
    verdicts = [[False, True, True, False], [True, False, False, True]]
    assert refill.kept_counts(verdicts, 2) == [2, 2] and not refill.short(verdicts, 2)
    assert refill.short(verdicts[:1], 2)
    chosen = refill.picks(verdicts, 2)
    assert chosen[0] == [refill.Pick(0, 1, True), refill.Pick(1, 0, True)]
    assert chosen[1] == [refill.Pick(0, 0, True), refill.Pick(1, 1, True)]
    # rows of the gathered batch: process 0's groups, then process 1's, each group's rows in order
    assert refill.gathered_rows(chosen, 2, 2) == [(0, 2), (0, 3), (1, 0), (1, 1), (0, 4), (0, 5), (1, 6), (1, 7)]


def test_a_batch_short_after_the_last_round_is_filled_with_dropped_groups():
    chosen = refill.picks([[False, False, True], [False, False, False]], 1)
    assert chosen == [[refill.Pick(0, 2, True), refill.Pick(0, 0, False), refill.Pick(0, 1, False)]]


def test_rows_of_rounds_of_different_lengths_are_padded_on_their_sides():
    pad = 9
    first = {"prompt_ids": torch.tensor([[pad, 1], [2, 3]]), "prompt_mask": torch.tensor([[0, 1], [1, 1]]),
             "completion_ids": torch.tensor([[4, pad], [5, 6]]), "completion_mask": torch.tensor([[1, 0], [1, 1]]),
             "old_per_token_logps": torch.tensor([[-1.0, 0.0], [-2.0, -3.0]]), "advantages": torch.zeros(2),
             "num_items_in_batch": torch.tensor(3)}
    second = {"prompt_ids": torch.tensor([[7, 7, 7], [pad, pad, 8]]),
              "prompt_mask": torch.tensor([[1, 1, 1], [0, 0, 1]]),
              "completion_ids": torch.tensor([[4], [5]]), "completion_mask": torch.tensor([[1], [1]]),
              "old_per_token_logps": torch.tensor([[-4.0], [-5.0]]), "advantages": torch.zeros(2),
              "num_items_in_batch": torch.tensor(2)}
    assert refill.unsupported_keys(first) == []
    merged = refill.assemble([first, second], [refill.Pick(1, 0, True), refill.Pick(0, 0, True)], 2, pad)
    assert merged["prompt_ids"].tolist() == [[7, 7, 7], [pad, pad, 8], [pad, pad, 1], [pad, 2, 3]]
    assert merged["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]]
    assert merged["completion_ids"].tolist() == [[4, pad], [5, pad], [4, pad], [5, 6]]
    assert merged["completion_mask"].tolist() == [[1, 0], [1, 0], [1, 0], [1, 1]]
    assert merged["old_per_token_logps"].tolist() == [[-4.0, 0.0], [-5.0, 0.0], [-1.0, 0.0], [-2.0, -3.0]]
    assert "advantages" not in merged and "num_items_in_batch" not in merged
    assert refill.unsupported_keys({**first, "pixel_values": torch.zeros(1)}) == ["pixel_values"]


def _groups(rows, size):
    """Rows in groups, each row's reward rounded (the hooks see float32 rewards)."""
    rows = [(p, c, round(r, 5)) for p, c, r in rows]
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def _spread(group):
    rewards = torch.tensor([r for _, _, r in group])
    return rewards.std(unbiased=False).item() > 0


@pytest.mark.slow
@pytest.mark.parametrize("everywhere, max_rounds", [(False, 3), (True, 1)])
def test_in_a_run_dropped_groups_are_replaced_by_newly_sampled_ones(cli, online_recipe, tmp_path, everywhere,
                                                                    max_rounds):
    """Every batch the advantage hooks see is made of the kept groups of the rounds the reward source scored,
    in the order sampled, then (when the rounds ran out) of dropped ones; it always has the configured size;
    the logged counts are those of the scored rounds."""
    online_plugins.SCORED_ROUNDS.clear()
    online_plugins.ADVANTAGE_BATCHES.clear()
    plugins = {"online_plugins:ConstantOnEvenPrompts": {"everywhere": everywhere},
               "dynamic_sampling": {"max_rounds": max_rounds}, **GROUP_PLUS_NORM,
               "online_plugins:SeenByAdvantages": {}}
    recipe = online_recipe(plugins=plugins, training={"max_steps": 3}, eval={"generate": 0})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    logged = [m for m in read_jsonl(Path(tmp_path / "run" / "metrics.jsonl")) if "filter_groups/kept" in m]
    assert len(logged) == 3 == len(online_plugins.ADVANTAGE_BATCHES)
    rounds = iter(online_plugins.SCORED_ROUNDS)
    refilled = 0
    for metrics, batch in zip(logged, online_plugins.ADVANTAGE_BATCHES, strict=True):
        sampled = [next(rounds) for _ in range(int(metrics["filter_groups/rounds"]))]
        assert 1 <= len(sampled) <= max_rounds + 1 and all(len(s) == 8 for s in sampled)
        groups = [g for s in sampled for g in _groups(s, 4)]
        kept = [g for g in groups if _spread(g)]
        dropped = [g for g in groups if not _spread(g)]
        assert _groups(batch, 4) == (kept + dropped)[:2]  # the batch trained on: 8 completions, always
        assert metrics["filter_groups/kept"] == min(len(kept), 2)
        assert metrics["filter_groups/filled_with_dropped"] == 2 - min(len(kept), 2)
        assert metrics["filter_groups/dropped"] == len(dropped)
        assert metrics["filter_groups/extra_completions"] == 8 * (len(sampled) - 1)
        # another round was sampled exactly when the rounds before it kept fewer than 2 groups
        assert (len(sampled) > 1) == (sum(_spread(g) for g in _groups(sampled[0], 4)) < 2)
        refilled += len(sampled) > 1
    assert next(rounds, None) is None  # nothing was scored that the steps do not account for
    if everywhere:
        assert all(m["filter_groups/rounds"] == 2 and m["filter_groups/kept"] == 0 for m in logged)
    else:
        assert refilled >= 1, "no step needed a refill; the test shows nothing (prompts of even length: half)"


def test_a_filter_needs_groups_and_whole_groups_per_process(cli, online_recipe, monkeypatch):
    single = online_recipe(name="single", plugins={"online_plugins:DigitShare": {}, "dynamic_sampling": {},
                                                   "critic": {}, "gae": {}}, training={"num_generations": 1})
    code, _, err = cli("validate", single)
    assert code == 2 and "plugins.dynamic_sampling" in err and "num_generations 1" in err, err
    # two processes of 2 completions each: the batch of 4 is one group of 4, split between them
    split = online_recipe(name="split", plugins={"online_plugins:DigitShare": {}, "dynamic_sampling": {},
                                                 **GROUP_PLUS_NORM},
                          training={"per_device_train_batch_size": 2, "num_generations": 4})
    code, _, err = cli("validate", split)
    assert code == 2 and "generation batch of 2" in err, err  # one process: GRPO's own batch check
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli("validate", split)
    assert code == 2 and "training.per_device_train_batch_size" in err and "groups of num_generations=4" in err, err
    assert "refills the batch group by group" in err


def test_outside_the_online_stage_it_is_refused(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"dpo": {}, "dynamic_sampling": {}}))
    assert code == 2 and "dynamic_sampling" in err, err


def test_a_filter_returning_a_wrong_number_of_flags_is_named(cli, online_recipe, tmp_path):
    recipe = online_recipe(plugins={"online_plugins:DigitShare": {}, "online_plugins:WrongGroupCount": {},
                                    **GROUP_PLUS_NORM}, training={"max_steps": 1}, eval={"generate": 0})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 2 and "wrong_group_count" in err and "posttrain_filter_groups" in err, err


@pytest.mark.slow
def test_two_processes_refill_their_own_groups_and_agree_on_the_counts(online_recipe, tmp_path):
    """Two CPU processes (torchrun, gloo), one group each: a process whose group was dropped samples again
    with the other (generation and gathering are collective), both assemble the same gathered batch, and the
    advantages whitened over it have mean 0 and std 1."""
    import json
    import os
    import subprocess
    import sys

    from conftest import cpu_processes_env, free_port

    run = tmp_path / "run"
    recipe = online_recipe(plugins={"online_plugins:ConstantOnEvenPrompts": {}, "dynamic_sampling": {},
                                    "group_relative": {}, "advantage_norm": {"scope": "batch"}},
                           training={"max_steps": 3, "per_device_train_batch_size": 4}, eval={"generate": 0})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", free_port(), "-m", "posttrain.cli", "run", str(recipe), "--output-dir", str(run)]
    env = cpu_processes_env(PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    logged = [m for m in read_jsonl(run / "metrics.jsonl") if "filter_groups/kept" in m]
    assert len(logged) == 3
    for m in logged:
        assert m["filter_groups/kept"] + m["filter_groups/filled_with_dropped"] == 2
        assert m["filter_groups/extra_completions"] == 8 * (m["filter_groups/rounds"] - 1)
        if m["filter_groups/kept"] == 2:
            assert m["advantages/mean"] == pytest.approx(0, abs=1e-5)
            assert m["advantages/std"] == pytest.approx(1, abs=1e-2)
    assert any(m["filter_groups/rounds"] > 1 for m in logged), "no step refilled; the test shows nothing"
