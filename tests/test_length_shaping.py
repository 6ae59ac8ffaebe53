"""Length-aware shaping in the online stage: DAPO's soft overlong punishment (`overlong_penalty`) and the
missing-EOS penalty (`missing_eos_penalty`), by hand and in runs, and their refusals at validate; TRL's
mask_truncated_completions passed through and acting."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import GROUP_PLUS_NORM, read_jsonl

from posttrain.plugins.overlong_penalty import OverlongPenalty, soft_overlong


def _penalty(**options):
    plugin = OverlongPenalty(OverlongPenalty.Options(**options))
    plugin.posttrain_trl_config(stage="online", recipe={"training": {"max_completion_length": 16}})
    return plugin


def test_the_penalty_ramps_from_zero_to_minus_one_over_the_buffer():
    plugin = _penalty(max_length=16, buffer=4, factor=2.0)
    lengths = [1, 12, 13, 14, 15, 16, 17]
    # by hand: 0 up to L - B = 12, then ((L - B) - n) / B, then -1 past the limit; times the factor
    expected = [0.0, 0.0, -0.5, -1.0, -1.5, -2.0, -2.0]
    assert plugin.posttrain_reward(completion_ids=[[7] * n for n in lengths]) == pytest.approx(expected)
    assert soft_overlong(13, 16, 4) == pytest.approx(-0.25)


def test_the_limit_and_buffer_default_to_the_stages_and_a_quarter_of_it():
    plugin = _penalty()  # the recipe's training.max_completion_length: 16; buffer 16 // 4 = 4
    assert plugin.limit == 16 and plugin.buffer == 4
    assert plugin.posttrain_reward(completion_ids=[[1] * 12, [1] * 14]) == pytest.approx([0.0, -0.5])


@pytest.mark.parametrize("options, limit, field, words", [
    ({}, None, "plugins.overlong_penalty.max_length", "completion limit"),
    ({"buffer": 20}, 12, "plugins.overlong_penalty.buffer", "longer than the limit (12)"),
])
def test_what_cannot_act_is_refused_at_validate(cli, online_recipe, options, limit, field, words):
    recipe = online_recipe(plugins={"overlong_penalty": options, **GROUP_PLUS_NORM})
    data = yaml.safe_load(recipe.read_text())
    if limit is None:
        del data["training"]["max_completion_length"]
    recipe.write_text(yaml.safe_dump(data))
    code, _, err = cli("validate", recipe)
    assert code == 2 and field in err and words in err, err


def test_a_stage_without_completion_limits_refuses_it(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"dpo": {}, "overlong_penalty": {"max_length": 8}}))
    assert code == 2 and "applies to the online stage" in err, err


@pytest.mark.slow
def test_in_a_run_the_penalty_is_the_logged_completion_lengths_under_the_ramp(cli, online_recipe, tmp_path):
    """With the buffer the whole limit the ramp is linear, R = -factor * n / L, so the source's logged mean
    must equal -factor * TRL's own completions/mean_length / L at every step (EOS counted by both)."""
    recipe = online_recipe(plugins={"verify_gsm8k": {}, "overlong_penalty": {"buffer": 12, "factor": 0.5},
                                    **GROUP_PLUS_NORM}, training={"max_steps": 2}, eval={"generate": 0})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    logged = [m for m in read_jsonl(Path(tmp_path / "run" / "metrics.jsonl")) if "rewards/overlong_penalty/mean" in m]
    assert len(logged) == 2
    for m in logged:
        assert m["rewards/overlong_penalty/mean"] == pytest.approx(-0.5 * m["completions/mean_length"] / 12, abs=1e-5)
        assert m["reward"] == pytest.approx(m["rewards/verify_gsm8k/mean"] + m["rewards/overlong_penalty/mean"],
                                            abs=1e-5)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["global_step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("mask", [True, False])
def test_truncated_completions_leave_the_loss_with_trls_mask_truncated_completions(cli, online_recipe, tmp_path,
                                                                                  mask):
    """TRL's own option passes through and acts: on a step whose every completion was cut at the limit (the
    tiny random model rarely ends one), nothing is left to train on with the option, and the loss and
    gradient are 0; without it they are not."""
    recipe = online_recipe(training={"max_completion_length": 3, "max_steps": 2, "mask_truncated_completions": mask},
                           eval={"generate": 0})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    steps = [m for m in read_jsonl(Path(tmp_path / "run" / "metrics.jsonl"))
             if m.get("completions/clipped_ratio") == 1.0 and "loss" in m]
    assert steps, "no step had every completion cut at the limit"
    for m in steps:
        if mask:
            assert m["loss"] == 0.0 and m["grad_norm"] == 0.0
        else:
            assert m["grad_norm"] > 0.0


def test_missing_eos_penalty_by_hand():
    from posttrain.plugins.missing_eos_penalty import MissingEOSPenalty

    plugin = MissingEOSPenalty(MissingEOSPenalty.Options(penalty=0.75))
    assert plugin.posttrain_reward(truncated=[True, False, True]) == [-0.75, 0.0, -0.75]


@pytest.mark.slow
def test_in_a_run_the_missing_eos_penalty_is_the_clipped_share(cli, online_recipe, tmp_path):
    """The source's logged mean is -penalty x TRL's own completions/clipped_ratio at every step."""
    recipe = online_recipe(plugins={"verify_gsm8k": {}, "missing_eos_penalty": {"penalty": 0.5},
                                    **GROUP_PLUS_NORM}, training={"max_steps": 2, "max_completion_length": 4},
                           eval={"generate": 0})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    logged = [m for m in read_jsonl(Path(tmp_path / "run" / "metrics.jsonl"))
              if "rewards/missing_eos_penalty/mean" in m]
    assert len(logged) == 2
    for m in logged:
        assert m["rewards/missing_eos_penalty/mean"] == pytest.approx(-0.5 * m["completions/clipped_ratio"], abs=1e-6)


def test_missing_eos_penalty_applies_to_the_online_stage_only(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"dpo": {}, "missing_eos_penalty": {}}))
    assert code == 2 and "applies to the online stage" in err, err
