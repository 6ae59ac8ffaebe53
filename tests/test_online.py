"""The online stage (TRL's GRPOTrainer driven by hooks) on the tiny random Llama: real runs through
the CLI, the reward sources as TRL reward functions, advantages from the plugins (checked against
TRL's own GRPO and RLOO advantages and against hand computations), the sampler hook, per-token
advantages, and every recipe mistake refused before a model loads."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import cpu_processes_env, GROUP_PLUS_NORM, read_jsonl

from posttrain.plugins.advantage_norm import AdvantageNorm
from posttrain.plugins.group_relative import GroupRelative
from posttrain.plugins.leave_one_out import LeaveOneOut
from posttrain.testing import make_rollouts

def _run(cli, recipe, out):
    code, stdout, err = cli("run", recipe, "--output-dir", out)
    assert code == 0, err
    return json.loads((Path(out) / "summary.json").read_text()), read_jsonl(Path(out) / "metrics.jsonl"), stdout


def _build(recipe_path, run_dir):
    from posttrain.trainers.online import build_trainer
    from posttrain.pipeline import load_recipe
    from posttrain.validate import validate

    return build_trainer(validate(load_recipe(recipe_path)), run_dir)


# -- real runs ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_online_run_logs_each_source_and_fills_the_run_dir(cli, online_recipe, tmp_path):
    recipe = online_recipe(plugins={"online_plugins:DigitShare": {"weight": 0.5}, "verify_gsm8k": {"alpha": 2.0},
                                    **GROUP_PLUS_NORM})
    summary, metrics, out = _run(cli, recipe, tmp_path / "run")
    assert summary["stage"] == "online" and summary["global_step"] == 3
    assert [m["step"] for m in metrics if "reward" in m] == [1, 2, 3]
    for m in (m for m in metrics if "reward" in m):
        # every source logged on its own; the headline reward is their weighted sum (no abstentions here)
        expected = 0.5 * m["rewards/digit_share/mean"] + 1.0 * m["rewards/verify_gsm8k/mean"]
        assert m["reward"] == pytest.approx(expected, abs=1e-6)
        assert 0 <= m["rewards/verify_gsm8k/mean"] <= 2.0
    assert [p["step"] for p in summary["reward_curve"]] == [1, 2, 3]
    assert set(summary["reward_curve"][0]) == {"step", "reward", "digit_share", "verify_gsm8k"}
    assert summary["before"]["answers"]["n"] == 4 and summary["after"]["answers"]["n"] == 4
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()
    assert "finished: 3 steps" in out and "reward" in out


@pytest.mark.slow
def test_graded_reward_rises_with_full_finetuning(cli, online_recipe, tmp_path):
    """The policy gradient really trains the policy: on a reward a random model can move (the share
    of digits it writes), the mean reward of the last steps beats the first steps'."""
    recipe = online_recipe(model={"lora": None},
                           training={"max_steps": 12, "learning_rate": 3e-2, "max_completion_length": 8,
                                     "per_device_train_batch_size": 16},
                           eval={"generate": 0})
    summary, metrics, _ = _run(cli, recipe, tmp_path / "run")
    rewards = [m["reward"] for m in metrics if "reward" in m]
    assert len(rewards) == 12
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1, rewards


@pytest.mark.slow
def test_qlora_4bit_policy_trains(cli, online_recipe, tmp_path):
    recipe = online_recipe(model={"lora": {"r": 8, "alpha": 16}, "quantization": {"bits": 4}})
    summary, metrics, _ = _run(cli, recipe, tmp_path / "run")
    assert summary["global_step"] == 3
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    assert any(m["grad_norm"] > 0 for m in metrics if "grad_norm" in m)


@pytest.mark.slow
def test_abstaining_source_leaves_unscored_rows_at_zero_advantage(online_recipe, tmp_path):
    """A source may abstain per example (None): those rows get no reward and advantage 0."""
    rows = [{"prompt": f"Question {i}:", "score_me": i % 2 == 0} for i in range(16)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = online_recipe(data={"source": str(data), "options": {}, "eval": {"fraction": 0.0}}, eval={"generate": 0},
                           plugins={"online_plugins:ScoreWhenAsked": {}, "group_relative": {}})
    trainer, _ = _build(recipe, tmp_path / "run")
    batch = [rows[0]] * 4 + [rows[1]] * 4  # one scored prompt, one unscored, 4 completions each
    output = trainer._generate_and_score_completions(batch)
    assert output["advantages"][4:].eq(0).all()
    assert torch.isfinite(output["advantages"]).all()


# -- advantages: TRL parity and hand computations -------------------------------------------------


class _Capture:
    """Mixed into a TRL trainer: keep the gathered rewards and the advantages TRL computed."""

    def _calculate_rewards(self, *args):
        self.captured_rewards = super()._calculate_rewards(*args)
        return self.captured_rewards

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.captured_advantages = output["advantages"]
        return output


def _noisy_reward(prompts, completions, **kwargs):
    """Graded, with ties and abstentions: exercises every branch of the estimators."""
    out = []
    for i, c in enumerate(completions):
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(None if i % 7 == 3 else float(sum(map(ord, text)) % 5))
    return out


def _trl_advantages(trainer_cls, config_cls, tiny_model_dir, tmp_path, **config):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.builtin import WordProblemOptions, word_problems

    cls = type("Captured", (_Capture, trainer_cls), {})
    args = config_cls(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=16, num_generations=4,
                      max_completion_length=8, max_steps=1, use_cpu=True, bf16=False, report_to="none",
                      save_strategy="no", seed=3, **config)
    data = Dataset.from_list(word_problems(WordProblemOptions(n=16, seed=1)))
    trainer = cls(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), reward_funcs=[_noisy_reward],
                  args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    trainer.train()
    rewards = trainer.captured_rewards[:, 0]
    return rewards, trainer.captured_advantages


def _ours(plugins, rewards, group=4):
    from posttrain.plugin_set import PluginSet

    rollouts = make_rollouts([None if math.isnan(r) else r for r in rewards.tolist()], group)
    advantages = plugins[0].posttrain_advantage_estimate(rollouts)
    for plugin in plugins[1:]:
        advantages = plugin.posttrain_advantage_transform(advantages, rollouts)
    assert PluginSet(plugins)  # the combination is a valid plugin set
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("scale,ours", [
    ("none", lambda: [GroupRelative()]),
    ("group", lambda: [GroupRelative(), AdvantageNorm(AdvantageNorm.Options(scope="group"))]),
], ids=["group_relative=scale_none", "group_relative+norm_group=scale_group"])
def test_group_relative_matches_trl_grpo(tiny_model_dir, tmp_path, scale, ours):
    from trl import GRPOConfig, GRPOTrainer

    rewards, trl_advantages = _trl_advantages(GRPOTrainer, GRPOConfig, tiny_model_dir, tmp_path, scale_rewards=scale)
    assert torch.isnan(rewards).any() and len(set(rewards[~torch.isnan(rewards)].tolist())) > 2
    assert torch.allclose(_ours(ours(), rewards), trl_advantages, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("normalize", [False, True], ids=["leave_one_out", "leave_one_out+norm_batch"])
def test_leave_one_out_matches_trl_rloo(tiny_model_dir, tmp_path, normalize):
    from trl import RLOOConfig, RLOOTrainer

    rewards, trl_advantages = _trl_advantages(RLOOTrainer, RLOOConfig, tiny_model_dir, tmp_path,
                                              normalize_advantages=normalize)
    plugins = [LeaveOneOut()] + ([AdvantageNorm(AdvantageNorm.Options(scope="batch"))] if normalize else [])
    assert torch.allclose(_ours(plugins, rewards), trl_advantages, atol=1e-5)


def test_estimators_by_hand():
    rewards = [1.0, 2.0, 3.0, 6.0, 0.0, 0.0, None, 3.0]
    rollouts = make_rollouts(rewards, 4)
    grouped = [[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, None, 3.0]]
    expected_gr, expected_loo = [], []
    for group in grouped:
        scored = [r for r in group if r is not None]
        for r in group:
            if r is None:
                expected_gr.append(float("nan"))
                expected_loo.append(float("nan"))
                continue
            expected_gr.append(r - sum(scored) / len(scored))
            expected_loo.append(r - (sum(scored) - r) / (len(scored) - 1))
    gr = GroupRelative().posttrain_advantage_estimate(rollouts)
    loo = LeaveOneOut().posttrain_advantage_estimate(rollouts)
    assert torch.allclose(gr, torch.tensor(expected_gr), equal_nan=True)
    assert torch.allclose(loo, torch.tensor(expected_loo), equal_nan=True)
    # RLOO's advantage is the group-relative one scaled by k/(k-1)
    assert loo[:4] == pytest.approx((gr[:4] * 4 / 3).tolist())


def test_advantage_norm_statistics_by_hand():
    values = [1.0, -2.0, 0.5, 4.0, None, 3.0, -1.0, 0.0]
    rollouts = make_rollouts(values, 4)
    advantages = rollouts.rewards.clone()
    batch = AdvantageNorm(AdvantageNorm.Options(scope="batch")).posttrain_advantage_transform(advantages, rollouts)
    scored = [v for v in values if v is not None]
    mean = sum(scored) / len(scored)
    std = (sum((v - mean) ** 2 for v in scored) / (len(scored) - 1)) ** 0.5
    expected = [float("nan") if v is None else (v - mean) / (std + 1e-4) for v in values]
    assert torch.allclose(batch, torch.tensor(expected), equal_nan=True, atol=1e-6)
    kept = batch[~torch.isnan(batch)]
    assert kept.mean().item() == pytest.approx(0, abs=1e-6) and kept.std().item() == pytest.approx(1, abs=1e-3)
    group = AdvantageNorm(AdvantageNorm.Options(scope="group")).posttrain_advantage_transform(advantages, rollouts)
    for g in group.view(2, 4):
        g = g[~torch.isnan(g)]
        assert g.mean().item() == pytest.approx(0, abs=1e-6) and g.std().item() == pytest.approx(1, abs=1e-3)
    scaled = AdvantageNorm(AdvantageNorm.Options(center=False)).posttrain_advantage_transform(advantages, rollouts)
    assert torch.allclose(scaled, rollouts.rewards / (std + 1e-4), equal_nan=True, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("norm", [None, "batch"], ids=["off", "batch"])
def test_what_reaches_the_loss_is_whitened_only_with_advantage_norm(online_recipe, tmp_path, norm):
    """advantage_norm on: the advantages the loss receives over a generation batch have mean 0 and
    std 1; off: they are the raw group-relative advantages (their std is the rewards' spread)."""
    plugins = {"online_plugins:DigitShare": {"weight": 3.0}, "group_relative": {}}
    if norm:
        plugins["advantage_norm"] = {"scope": norm}
    trainer, _ = _build(online_recipe(plugins=plugins, eval={"generate": 0}), tmp_path / "run")
    seen = []
    compute_loss = trainer._compute_loss

    def spy(model, inputs):
        seen.append(inputs["advantages"].detach().clone())
        return compute_loss(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    assert len(seen) == 3  # one generation batch (8 completions, 2 prompts) per step
    for advantages in seen:
        assert advantages.shape == (8,)
        if norm:
            assert advantages.mean().item() == pytest.approx(0, abs=1e-5)
            assert advantages.std().item() == pytest.approx(1, abs=1e-2)
        else:
            for a in advantages:  # unnormalised: bounded by the reward range (3 x a share in [0, 1])
                assert -3.0 <= a <= 3.0
    if not norm:
        assert any(a.abs().max() > 0 and abs(a.std().item() - 1) > 0.05 for a in seen)


@pytest.mark.slow
@pytest.mark.parametrize("prompts_per_update", [None, 6], ids=["off", "6_prompts"])
def test_large_batch_sets_prompts_per_policy_update(online_recipe, tmp_path, prompts_per_update):
    """large_batch on: each optimizer step follows one generation batch of prompts_per_update
    prompts (x num_generations completions), split into passes of the per-device batch; off: TRL's
    settings (one pass of 8 completions = 2 prompts per step)."""
    plugins = {"online_plugins:DigitShare": {}, "group_relative": {}}
    if prompts_per_update:
        plugins["large_batch"] = {"prompts_per_update": prompts_per_update}
    trainer, _ = _build(online_recipe(plugins=plugins, training={"max_steps": 2}, eval={"generate": 0}),
                        tmp_path / "run")
    generations, passes = [], []
    generate, compute_loss = trainer._generate_and_score_completions, trainer._compute_loss

    def spy_generate(inputs):
        generations.append((trainer.state.global_step, len(inputs), len({str(x["prompt"]) for x in inputs})))
        return generate(inputs)

    def spy_loss(model, inputs):
        passes.append(inputs["completion_ids"].shape[0])
        return compute_loss(model, inputs)

    trainer._generate_and_score_completions, trainer._compute_loss = spy_generate, spy_loss
    trainer.train()
    prompts = prompts_per_update or 2
    assert trainer.args.gradient_accumulation_steps == prompts * 4 // 8
    assert [g[0] for g in generations] == [0, 1]  # one generation batch per optimizer step
    assert all(size == prompts * 4 and distinct == prompts for _, size, distinct in generations)
    assert passes == [8] * (2 * prompts * 4 // 8)


# -- the sampler hook and per-token advantages ---------------------------------------------------


@pytest.mark.slow
def test_sampler_plugin_provides_the_rollouts(online_recipe, tmp_path):
    rows = [{"prompt": f"Q{i}", "answer": "42" if i % 2 else "7"} for i in range(16)]  # the gold under another name
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = online_recipe(data={"source": str(data), "options": {}, "columns": {"ground_truth": "answer"},
                                 "eval": {"fraction": 0.0}}, eval={"generate": 0},
                           plugins={"online_plugins:FixedSampler": {"text": "The answer is 42"},
                                    "verify_gsm8k": {"alpha": 1.0}, "group_relative": {}})
    trainer, _ = _build(recipe, tmp_path / "run")
    trainer.train()
    sampler = trainer.plugins.by_name["fixed_sampler"]
    assert [c[:2] for c in sampler.calls] == [(8, 1)] * 3
    assert sampler.calls[0][2]["max_new_tokens"] == 12 and sampler.calls[0][2]["temperature"] == 1.0
    rewards = [h["rewards/verify_gsm8k/mean"] for h in trainer.state.log_history if "reward" in h]
    assert rewards == [0.5, 0.5, 0.5]  # "42" is right for exactly the odd rows
    ids = trainer._completion_ids("The answer is 42")
    assert ids[-1] == trainer.processing_class.eos_token_id
    assert trainer.processing_class.decode(ids[:-1]) == "The answer is 42"


def test_per_token_advantages_reach_the_loss(online_recipe, tmp_path):
    """An estimator may return one advantage per token (what a value-model / GAE estimator gives);
    advantage_norm then whitens over the unmasked tokens."""
    plugins = {"online_plugins:DigitShare": {}, "online_plugins:TokenAdvantage": {}, "advantage_norm": {}}
    trainer, _ = _build(online_recipe(plugins=plugins, eval={"generate": 0}), tmp_path / "run")
    seen = []
    compute_loss = trainer._compute_loss

    def spy(model, inputs):
        seen.append((inputs["advantages"].detach().clone(), inputs["completion_mask"].clone()))
        return compute_loss(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    advantages, mask = seen[0]
    assert advantages.shape == mask.shape and advantages.dim() == 2
    tokens = advantages[mask.bool()]
    assert tokens.mean().item() == pytest.approx(0, abs=1e-5) and tokens.std().item() == pytest.approx(1, abs=0.05)
    assert advantages[~mask.bool()].eq(0).all()


# -- recipe mistakes, refused before anything loads ----------------------------------------------


@pytest.mark.parametrize("plugins,training,message", [
    ({"group_relative": {}}, {}, "no enabled plugin implements 'posttrain_reward'"),
    ({"verify_gsm8k": {}}, {}, "enable one of: gae, group_relative, leave_one_out, reinforce_pp (e.g. `plugins: {group_relative: {}}`)"),
    ({"verify_gsm8k": {}, "group_relative": {}, "leave_one_out": {}}, {},
     "'group_relative' and 'leave_one_out' both implement 'posttrain_advantage_estimate'"),
    ({"verify_gsm8k": {}, "group_relative": {}, "dpo": {}}, {}, "plugin 'dpo' does nothing in the online stage"),
    ({"verify_gsm8k": {}, "group_relative": {}, "ref_ema": {}}, {},
     "plugin 'ref_ema' needs a reference model"),
    ({"verify_gsm8k": {}, "group_relative": {}}, {"num_generations": 1}, "num_generations must be at least 2"),
    ({"verify_gsm8k": {}, "group_relative": {}}, {"num_generations": 3}, "does not split into groups"),
    ({"verify_gsm8k": {}, "group_relative": {}}, {"scale_rewards": "group"}, "enable advantage_norm"),
    ({"verify_gsm8k": {}, "group_relative": {}}, {"max_length": 64}, "use max_completion_length"),
    ({"verify_gsm8k": {}, "group_relative": {}, "large_batch": {"prompts_per_update": 3}}, {},
     "do not split into passes of 8 completions"),
    ({"verify_gsm8k": {}, "group_relative": {}, "large_batch": {"prompts_per_update": 4}},
     {"gradient_accumulation_steps": 1}, "an enabled plugin sets 2"),
])
def test_online_recipe_mistakes_exit_2(cli, online_recipe, plugins, training, message):
    code, _, err = cli("validate", online_recipe(plugins=plugins, **({"training": training} if training else {})))
    assert code == 2 and message in err, err


def test_preference_only_plugins_and_stage_mixups(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"dpo": {}, "large_batch": {}}))
    assert code == 2 and "plugin 'large_batch' applies to the online stage, not to preference" in err
    code, _, err = cli("validate", write_recipe(plugins={"dpo": {}, "group_relative": {}}))
    assert code == 2 and "plugin 'group_relative' does nothing in the preference stage" in err


def test_online_data_needs_a_prompt_column(cli, online_recipe, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"question": "Q", "ground_truth": "1"}) + "\n")
    code, _, err = cli("validate", online_recipe(data={"source": str(data), "options": {}}))
    assert code == 2 and "the online stage needs a 'prompt' column" in err and "columns: {prompt:" in err


def test_trl_refusal_is_a_user_error_before_the_model_loads(cli, online_recipe, tmp_path, monkeypatch):
    import posttrain.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(posttrain.models, "load_model", no_model)
    recipe = online_recipe(training={"generation_batch_size": 12, "steps_per_generation": 2})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 2 and "TRL refuses these settings" in err
    assert not (tmp_path / "run").exists()


# -- other reward sources and several processes --------------------------------------------------


@pytest.mark.slow
def test_instruction_prompts_train_against_verify_ifeval(cli, online_recipe, tmp_path):
    """The built-in IFEval-style prompts, scored by verify_ifeval (partial credit) next to a second
    source: both logged on their own, the run completes."""
    recipe = online_recipe(data={"source": "builtin:instructions", "options": {"n": 32}},
                           plugins={"verify_ifeval": {"partial": True, "alpha": 1.0},
                                    "online_plugins:DigitShare": {"weight": 0.1}, "group_relative": {}},
                           training={"max_steps": 2, "max_completion_length": 24})
    summary, metrics, _ = _run(cli, recipe, tmp_path / "run")
    steps = [m for m in metrics if "reward" in m]
    assert len(steps) == 2
    for m in steps:
        assert 0.0 <= m["rewards/verify_ifeval/mean"] <= 1.0
        assert m["reward"] == pytest.approx(m["rewards/verify_ifeval/mean"] + 0.1 * m["rewards/digit_share/mean"],
                                            abs=1e-6)


@pytest.mark.slow
def test_two_process_run_whitens_over_the_gathered_batch(online_recipe, tmp_path):
    """Two CPU processes (torchrun, gloo): each generates its own completions; the advantages are
    whitened over both processes' rows, so the logged (gathered) advantages have mean 0, std 1."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    run = tmp_path / "run"
    recipe = online_recipe(plugins={"online_plugins:DigitShare": {}, "group_relative": {},
                                    "advantage_norm": {"scope": "batch"}},
                           training={"max_steps": 2, "per_device_train_batch_size": 4}, eval={"generate": 0})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", free_port(), "-m", "posttrain.cli", "run", str(recipe), "--output-dir", str(run)]
    env = cpu_processes_env(PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    for m in (m for m in read_jsonl(run / "metrics.jsonl") if "reward" in m):
        assert m["advantages/mean"] == pytest.approx(0, abs=1e-5)
        assert m["advantages/std"] == pytest.approx(1, abs=1e-2)


@pytest.mark.slow
def test_reasoning_gym_tasks_are_a_built_in_source(cli, online_recipe, tmp_path):
    pytest.importorskip("reasoning_gym")
    recipe = online_recipe(data={"source": "builtin:reasoning_gym",
                                 "options": {"task": "chain_sum", "n": 32, "config": {"max_terms": 2, "max_digits": 1}}},
                           plugins={"verify_gsm8k": {"alpha": 1.0}, "group_relative": {}},
                           training={"max_steps": 2})
    summary, metrics, _ = _run(cli, recipe, tmp_path / "run")
    assert [m["step"] for m in metrics if "rewards/verify_gsm8k/mean" in m] == [1, 2]
    code, _, err = cli("validate", online_recipe(data={"source": "builtin:reasoning_gym",
                                                       "options": {"task": "chain_summ"}}))
    assert code == 2 and "chain_sum" in err and "data.options" in err


# -- evaluation during training ------------------------------------------------------------------


@pytest.mark.slow
def test_eval_strategy_steps_answers_the_heldout_prompts_every_eval_steps(cli, online_recipe, tmp_path):
    """`eval_strategy: steps` in the online stage: every eval_steps steps the greedy answers to
    eval.generate held-out prompts are scored by the reward sources and logged at that step (what the
    final held-out summary measures, as it goes), and `posttrain compare` draws them."""
    from posttrain.compare import load_runs, panels_for

    recipe = online_recipe(plugins={"online_plugins:DigitShare": {"weight": 0.5}, "verify_gsm8k": {},
                                    **GROUP_PLUS_NORM},
                           training={"max_steps": 4, "eval_strategy": "steps", "eval_steps": 2},
                           eval={"generate": 3, "max_new_tokens": 4, "before": False})
    summary, metrics, _ = _run(cli, recipe, tmp_path / "run")
    evals = [m for m in metrics if "eval_reward" in m]
    assert [m["step"] for m in evals] == [2, 4]
    for m in evals:
        assert 0.0 <= m["eval_answer_accuracy"] <= 1.0
        assert 0.0 <= m["eval_rewards/digit_share/mean"] <= 1.0 and 0.0 <= m["eval_rewards/verify_gsm8k/mean"] <= 1.0
        assert m["eval_reward"] == pytest.approx(0.5 * m["eval_rewards/digit_share/mean"]
                                                 + m["eval_rewards/verify_gsm8k/mean"], abs=1e-6)
        assert "reward" not in m and "loss" not in m  # a line of its own, apart from the training numbers
    # the last one is the final model's answers, as the summary's
    assert summary["after"]["answers"]["n"] == 3
    assert evals[-1]["eval_answer_accuracy"] == pytest.approx(summary["after"]["answers"]["answer_accuracy"])
    assert [p["step"] for p in summary["reward_curve"]] == [1, 2, 3, 4]
    names = [d.name for d in panels_for(load_runs(tmp_path / "run"))]
    assert {"online/eval_reward", "online/eval_answer_accuracy", "online/eval_reward_by_source/eval_rewards/"
            "digit_share/mean"} <= set(names), names
