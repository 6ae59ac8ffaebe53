"""posttrain's online stage against plain trl.GRPOTrainer, in one process.

The same GRPO workload (a random ~20M-parameter Llama, the built-in word problems, the same
reward function, seed and settings) runs through both trainers, alternating, several times.
posttrain gets the reward function as a plugin and GRPO's advantages as plugins
(group_relative + advantage_norm with scope 'group'); TRL gets the function itself and its default
scale_rewards='group'. Prints JSON with the median step time of each, their ratio, and the
per-step rewards and losses of both, which must be equal (same completions, same advantages).

    python bench/online.py [--steps 20] [--repeats 2] [--lora]

With ``--ppo`` it compares instead PPO with a critic (a LoRA critic on the policy's base, GAE with
the KL in the reward, one completion per prompt) against GRPO (4 completions per prompt), both
through posttrain, on the same prompts per step: the ratio of their step times.

    python bench/online.py --ppo [--steps 20] [--repeats 2] [--prompts 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from overhead import StepTimer, alternate, bench_model  # noqa: E402
from posttrain import Plugin, hookimpl  # noqa: E402
from posttrain.builtin import WordProblemOptions, word_problems  # noqa: E402
from posttrain.trainers.online import OnlineTrainer  # noqa: E402
from posttrain.plugins.advantage_norm import AdvantageNorm  # noqa: E402
from posttrain.plugins.group_relative import GroupRelative  # noqa: E402
from posttrain.plugin_set import PluginSet  # noqa: E402
from posttrain.types import completion_text  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402


def digit_share(prompts, completions, **kwargs):
    """The reward both trainers use: the share of the completion's characters that are digits."""
    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


class DigitShare(Plugin):
    name = "digit_share"
    description = "digit_share as a reward plugin"

    @hookimpl
    def posttrain_reward(self, prompts, completions, columns):
        return digit_share(prompts, completions)


def run_once(kind: str, model_dir: Path, data: Dataset, steps: int, lora: bool, out: Path) -> dict:
    from peft import LoraConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = GRPOConfig(output_dir=str(out / kind), learning_rate=1e-4, per_device_train_batch_size=16,
                      num_generations=4, max_completion_length=24, max_steps=steps, logging_steps=1,
                      save_strategy="no", report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False,
                      seed=0, disable_tqdm=True, **({"scale_rewards": "none"} if kind == "posttrain" else {}))
    peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    timer = StepTimer()
    common = dict(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft,
                  callbacks=[timer])
    if kind == "posttrain":
        plugins = PluginSet([DigitShare(), GroupRelative(), AdvantageNorm(AdvantageNorm.Options(scope="group"))])
        trainer = OnlineTrainer(plugins=plugins, **common)
    else:
        trainer = GRPOTrainer(reward_funcs=[digit_share], **common)
    trainer.remove_callback(PrinterCallback)  # keep stdout for the JSON report
    trainer.train()
    logged = [h for h in trainer.state.log_history if "reward" in h]
    warm = timer.times[3:] or timer.times
    return {"median_step_s": statistics.median(warm), "losses": [h["loss"] for h in logged],
            "rewards": [h["reward"] for h in logged]}


def run_method(method: str, model_dir: Path, data: Dataset, steps: int, prompts: int, out: Path) -> dict:
    """posttrain's online stage on the same prompts per step, as GRPO (group baseline, 4 completions per
    prompt) or as PPO with a critic (a LoRA critic on the policy's base, GAE, KL in the reward, one
    completion per prompt). LoRA policy, beta 0.05 (a reference pass) in both."""
    from peft import LoraConfig
    from posttrain.plugins.critic import CriticPlugin
    from posttrain.plugins.gae import GAE
    from posttrain.trainers.parts import finish_trainer
    from posttrain.models import Precision

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    group = 4 if method == "grpo" else 1
    # GRPOConfig refuses groups of one: build it with 2 and set 1, as posttrain's online stage does with a critic
    args = GRPOConfig(output_dir=str(out / method), learning_rate=1e-4, per_device_train_batch_size=prompts * group,
                      num_generations=max(group, 2), max_completion_length=24, max_steps=steps, logging_steps=1,
                      beta=0.05, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                      activation_checkpointing=False, seed=0, disable_tqdm=True, scale_rewards="none")
    args.num_generations = group
    if method == "grpo":
        plugins = PluginSet([DigitShare(), GroupRelative(), AdvantageNorm(AdvantageNorm.Options(scope="group"))])
    else:
        plugins = PluginSet([DigitShare(), CriticPlugin(CriticPlugin.Options(learning_rate=1e-3)), GAE(),
                             AdvantageNorm(AdvantageNorm.Options(scope="batch"))])
    timer = StepTimer()
    trainer = OnlineTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                   task_type="CAUSAL_LM"),
                            callbacks=[timer], plugins=plugins)
    finish_trainer(trainer, Precision("float32", "float32")).setup_critic()
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "reward" in h]
    warm = timer.times[3:] or timer.times
    return {"median_step_s": statistics.median(warm), "rewards": [h["reward"] for h in logged]}


def compare_ppo(args) -> dict:
    """PPO with a critic against GRPO, both through posttrain, the same prompts per step."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, n_params = bench_model(tmp / "model")
        data = Dataset.from_list(word_problems(WordProblemOptions(n=args.prompts * args.steps, seed=0)))
        results, grpo_step, ppo_step = alternate(
            lambda kind, i: run_method(kind, model_dir, data, args.steps, args.prompts, tmp / f"r{i}"), args.repeats,
            kinds=("grpo", "ppo"))
    return {
        "comparison": "posttrain PPO with a critic vs posttrain GRPO, the same prompts per step",
        "model_parameters": n_params, "steps": args.steps, "repeats": args.repeats, "prompts_per_step": args.prompts,
        "grpo": "group_relative + advantage_norm(group), 4 completions per prompt, beta 0.05 in the loss",
        "ppo": "critic (LoRA on the policy's base) + gae (KL in the reward) + advantage_norm(batch), 1 completion "
               "per prompt, beta 0.05",
        "grpo_median_step_s": round(grpo_step, 4), "ppo_median_step_s": round(ppo_step, 4),
        "ppo_to_grpo_step_time_ratio": round(ppo_step / grpo_step, 4),
        "grpo_rewards": results["grpo"][0]["rewards"], "ppo_rewards": results["ppo"][0]["rewards"],
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    parser.add_argument("--ppo", action="store_true",
                        help="instead: PPO with a critic vs GRPO, both through posttrain, the same prompts per step")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (with --ppo)")
    args = parser.parse_args(argv)
    if args.ppo:
        print(json.dumps(compare_ppo(args), indent=2))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, n_params = bench_model(tmp / "model")
        data = Dataset.from_list(word_problems(WordProblemOptions(n=4 * args.steps, seed=0)))
        results, trl_step, ours_step = alternate(
            lambda kind, i: run_once(kind, model_dir, data, args.steps, args.lora, tmp / f"r{i}"), args.repeats)
    trl_run, our_run = results["trl"][0], results["posttrain"][0]
    report = {
        "model_parameters": n_params,
        "steps": args.steps,
        "lora": args.lora,
        "repeats": args.repeats,
        "trl_median_step_s": round(trl_step, 4),
        "posttrain_median_step_s": round(ours_step, 4),
        "step_time_ratio": round(ours_step / trl_step, 4),
        "trl_rewards": trl_run["rewards"],
        "posttrain_rewards": our_run["rewards"],
        "max_abs_reward_difference": max(abs(a - b) for a, b in zip(trl_run["rewards"], our_run["rewards"])),
        "max_abs_loss_difference": max(abs(a - b) for a, b in zip(trl_run["losses"], our_run["losses"])),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
