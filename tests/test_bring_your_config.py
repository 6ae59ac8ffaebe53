"""Published training configs carried over: a recipe written from open-r1's GRPO demo config (its system prompt,
its reward functions as plain functions, its dataset's shape on a local copy, its prompt limit and schedule)
trains on SmolLM2-135M-Instruct, with nothing lost on the way."""

from __future__ import annotations

import json

import pytest
import yaml

# open-r1's recipes/Qwen2.5-1.5B-Instruct/grpo/config_demo.yaml: the system prompt, as published
OPEN_R1_SYSTEM_PROMPT = (
    "You are a helpful AI Assistant that provides well-reasoned and detailed responses. You first think about the "
    "reasoning process as an internal monologue and then provide the user with the answer. Respond in the following "
    "format: <think>\n...\n</think>\n<answer>\n...\n</answer>")


def _openr1_math_rows(n: int) -> list[dict]:
    """Rows in open-r1/OpenR1-Math-220k's schema (problem, solution with a boxed answer, answer, and its list
    columns), made up here: a local copy of the dataset's shape."""
    rows = []
    for i in range(n):
        a, b = 3 + i, 4 + 2 * i
        rows.append({"problem": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                     "solution": f"He has {a} + {b} = {a + b} apples, so the answer is $\\boxed{{{a + b}}}$.",
                     "answer": str(a + b), "problem_type": "Algebra", "question_type": "math-word-problem",
                     "source": "synthetic", "uuid": f"{i:08x}", "is_reasoning_complete": [True],
                     "generations": [f"<think>{a}+{b}</think>"], "correctness_math_verify": [True]})
    return rows


@pytest.mark.slow
def test_open_r1_grpo_demo_config_runs_on_smollm2(cli, tmp_path):
    data = tmp_path / "openr1_math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _openr1_math_rows(16)))
    recipe = {
        "stage": "online",
        "model": {"name_or_path": "builtin:smollm2-135m-instruct", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"source": "openr1_math.jsonl", "columns": {"prompt": "problem"},
                 "system_prompt": OPEN_R1_SYSTEM_PROMPT, "max_prompt_length": 512, "eval": {"fraction": 0.25}},
        # open-r1's reward_funcs [accuracy, format], as the plain functions people write for TRL
        "plugins": {"reward_functions:accuracy_reward": {}, "reward_functions:format_reward": {"weight": 0.5},
                    "group_relative": {}, "advantage_norm": {"scope": "group"}},
        "training": {"learning_rate": 2.0e-5, "lr_scheduler_type": "cosine", "warmup_steps": 0.1,
                     "max_completion_length": 12, "num_generations": 4, "per_device_train_batch_size": 4,
                     "max_steps": 2, "logging_steps": 1, "save_strategy": "no"},
        "eval": {"generate": 2, "max_new_tokens": 12},
    }
    path = tmp_path / "open-r1-grpo-demo.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, out, err = cli("validate", path)
    assert code == 0, err
    assert "prompts:  text prompts as a user turn of the chat template, after the system prompt" in out
    run = tmp_path / "run"
    code, out, err = cli("run", path, "--output-dir", run)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 2
    assert summary["prompts"].startswith("text prompts as a user turn of the chat template, after the system prompt")
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert all("rewards/accuracy_reward/mean" in entry and "rewards/format_reward/mean" in entry
               for entry in logged if "loss" in entry)
    # the held-out answers were generated from the same conversation the policy trained on
    example = summary["after"]["answers"]["examples"][0]
    assert example["prompt"].startswith(OPEN_R1_SYSTEM_PROMPT + " | Tom has")


def test_validate_reports_every_independent_error_at_once(cli, online_recipe, tmp_path):
    """A config carried over with several mistakes is cleared in one round: each problem with its field and fix."""
    recipe = yaml.safe_load(online_recipe().read_text())
    recipe["model"]["torch_dtype"] = "bfloat16"  # TRL's ModelConfig name
    recipe["data"]["dataset_name"] = "x"
    path = tmp_path / "first.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = cli("validate", path)
    assert code == 2 and "2 problems:" in err
    assert "1. model.torch_dtype: unknown key 'torch_dtype'" in err and "2. data.dataset_name: unknown key" in err
    del recipe["model"]["torch_dtype"], recipe["data"]["dataset_name"]
    recipe["training"].update({"bf16": True, "warmup_ratio": 0.1, "max_prompt_length": 512, "scale_rewards": "group"})
    recipe["plugins"]["verify_gsm9k"] = {}
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = cli("validate", path)
    assert code == 2 and "5 problems:" in err, err
    for words in ("plugins.verify_gsm9k: unknown plugin 'verify_gsm9k' (did you mean 'verify_gsm8k'",
                  "training.bf16: 'bf16' is not set here", "training.warmup_ratio:", "use warmup_steps",
                  "training.max_prompt_length:", "use data.max_prompt_length", "training.scale_rewards:"):
        assert words in err, words
    assert "internal error" not in err
