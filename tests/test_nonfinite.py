"""A run stops at the first non-finite loss or gradient norm, before the optimizer step, with a user
error (exit 2) that names the step and the last finite values; earlier checkpoints stay; a resume
with a changed recipe is refused (the resume rules). The NaN is forced by a plugin
(tests/online_plugins.py:NanFromStep) that poisons the policy's training forward passes."""

import math
from pathlib import Path

import pytest
from conftest import read_jsonl

NAN_AT = "online_plugins:NanFromStep"


@pytest.mark.slow
def test_preference_run_stops_at_the_first_nan_step(cli, write_recipe, tmp_path):
    recipe = write_recipe(plugins={"dpo": {"beta": 0.1}, NAN_AT: {"step": 5}},
                          training={"save_steps": 2, "logging_steps": 1, "max_steps": 8},
                          eval={"generate": 0})
    run = tmp_path / "run"
    code, _, err = cli("run", recipe, "--output-dir", run)
    assert code == 2, err
    assert "training stopped at step 5" in err
    assert "the last finite step was 4 (loss" in err and "gradient norm" in err
    assert "checkpoint-4, is kept" in err and "training.learning_rate" in err
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    logged = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]  # nothing logged for the bad step
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in logged)
    # the resume rules: a changed recipe is refused, and nothing in the directory is touched
    code, _, err = cli("run", recipe, "--output-dir", run, "--resume", "--set", "training.learning_rate=1e-4")
    assert code == 2 and "differs" in err
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
def test_weights_in_memory_are_never_updated_with_a_nan_step(write_recipe, tmp_path):
    import torch
    from posttrain.pipeline import load_recipe
    from posttrain.trainers.guard import NonFiniteTraining
    from posttrain.trainers.preference import build_trainer
    from posttrain.validate import validate

    recipe = write_recipe(model={"lora": None}, plugins={"dpo": {"beta": 0.1}, NAN_AT: {"step": 2}},
                          training={"save_strategy": "no"})
    trainer, _ = build_trainer(validate(load_recipe(recipe)), tmp_path / "run")
    with pytest.raises(NonFiniteTraining, match="training stopped at step 2"):
        trainer.train()
    assert trainer.state.global_step == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.slow
def test_online_run_stops_before_generating_with_broken_weights(cli, online_recipe, tmp_path):
    """Without the guard, the NaN step's update makes every weight NaN and the next generation fails
    inside sampling (on a GPU, a device-side assert), far from the cause."""
    from conftest import GROUP_PLUS_NORM

    recipe = online_recipe(model={"lora": None}, plugins={"online_plugins:DigitShare": {}, **GROUP_PLUS_NORM,
                                                          NAN_AT: {"step": 2}},
                           training={"max_steps": 4, "learning_rate": 1e-4}, eval={"generate": 0})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 2, err
    assert "training stopped at step 2" in err and "the last finite step was 1" in err
    run = Path(tmp_path) / "run"
    assert not (run / "summary.json").exists()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == [1]  # kept, for diagnosis
    code, _, err = cli("run", recipe, "--output-dir", run)  # the fix message's advice: --overwrite
    assert code == 2 and "--overwrite" in err
