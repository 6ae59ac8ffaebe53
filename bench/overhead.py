"""posttrain's preference trainer against plain trl.DPOTrainer, in one process.

The same DPO workload (a random ~20M-parameter Llama, the built-in arithmetic pairs, the same
seed and settings) runs through both trainers, alternating, several times. Prints JSON with the
median step time of each, their ratio, and the final and per-step losses of both, which must be
equal: posttrain's `dpo` plugin computes TRL's sigmoid loss.

    python bench/overhead.py [--steps 30] [--repeats 2] [--lora]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from posttrain.builtin import ArithmeticOptions, arithmetic  # noqa: E402
from posttrain.plugins.dpo import DPO  # noqa: E402
from posttrain.plugin_set import PluginSet  # noqa: E402
from posttrain.testing import build_tiny_model  # noqa: E402
from posttrain.trainers.preference import PreferenceTrainer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

BETA = 0.1


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step. With CUDA it waits for the GPU at both ends of the step, so
    that a step's queued kernels count in that step (a no-op on a CPU)."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(self._now() - self._start)


def bench_model(folder: Path) -> tuple[Path, int]:
    """The benchmarks' model: a random ~20M-parameter Llama saved to ``folder``, and its parameter count."""
    path = build_tiny_model(folder, hidden=512, layers=6, intermediate=1376, heads=8, kv_heads=8, vocab=1000)
    return path, sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())


def alternate(run, repeats: int, kinds: tuple[str, str] = ("trl", "posttrain")) -> tuple[dict[str, list[dict]], float, float]:
    """Run ``run(kind, repeat)`` for both kinds, alternating their order so that drift in machine
    speed hits both alike. Returns every result and the median step time of each kind (in ``kinds``'
    order)."""
    first, second = kinds
    results: dict[str, list[dict]] = {first: [], second: []}
    for i in range(repeats):
        for kind in (kinds if i % 2 == 0 else (second, first)):
            results[kind].append(run(kind, i))
    steps = {kind: statistics.median(r["median_step_s"] for r in runs) for kind, runs in results.items()}
    return results, steps[first], steps[second]


def run_once(kind: str, model_dir: Path, data: Dataset, steps: int, lora: bool, out: Path) -> dict:
    from peft import LoraConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(out / kind), beta=BETA, loss_type=["sigmoid"], learning_rate=1e-4,
                     per_device_train_batch_size=8, max_steps=steps, logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0,
                     disable_tqdm=True, max_length=128)
    peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    timer = StepTimer()
    common = dict(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft,
                  callbacks=[timer])
    if kind == "posttrain":
        trainer = PreferenceTrainer(plugins=PluginSet([DPO(DPO.Options(beta=BETA))]), **common)
    else:
        trainer = DPOTrainer(**common)
    trainer.remove_callback(PrinterCallback)  # keep stdout for the JSON report
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    warm = timer.times[3:] or timer.times
    return {"median_step_s": statistics.median(warm), "losses": losses}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, n_params = bench_model(tmp / "model")
        data = Dataset.from_list(arithmetic(ArithmeticOptions(n=8 * args.steps, seed=0)))
        results, trl_step, ours_step = alternate(
            lambda kind, i: run_once(kind, model_dir, data, args.steps, args.lora, tmp / f"r{i}"), args.repeats)
    trl_losses, our_losses = results["trl"][0]["losses"], results["posttrain"][0]["losses"]
    report = {
        "model_parameters": n_params,
        "steps": args.steps,
        "lora": args.lora,
        "repeats": args.repeats,
        "trl_median_step_s": round(trl_step, 4),
        "posttrain_median_step_s": round(ours_step, 4),
        "step_time_ratio": round(ours_step / trl_step, 4),
        "trl_final_loss": trl_losses[-1],
        "posttrain_final_loss": our_losses[-1],
        "max_abs_loss_difference": max(abs(a - b) for a, b in zip(trl_losses, our_losses)),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
