"""bench/gpu.py --smoke: the GPU benchmark's report, run on the CPU (also on a GPU machine) in a subprocess.

No timing is asserted: only that every workload reports every field, that the step times are
positive, that posttrain and plain TRL did the same arithmetic (first-step losses, GRPO rewards,
weight dtypes, tokens per step) and that Liger is reported as skipped without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.slow  # the benchmark scripts

REPO = Path(__file__).resolve().parent.parent

TOP = ("benchmark", "device", "cuda", "versions", "settings", "workloads")
SETTINGS = ("smoke", "steps", "warmup_steps", "repeats", "model", "precision", "activation_checkpointing", "dpo",
            "grpo", "lora", "peak_tflops", "peak_tflops_source")
EVERY = ("workload", "liger", "method", "lora", "posttrain_median_step_s", "trl_median_step_s", "step_time_ratio",
         "posttrain_step_s_per_repeat", "trl_step_s_per_repeat", "posttrain_tokens_per_step", "trl_tokens_per_step",
         "tokens_per_step_expected", "posttrain_tokens_per_s", "trl_tokens_per_s", "flops_per_step", "flops_formula",
         "posttrain_mfu", "trl_mfu", "mfu_note", "posttrain_peak_memory_gib", "trl_peak_memory_gib", "memory_note",
         "posttrain_first_loss", "trl_first_loss", "first_loss_difference", "max_abs_loss_difference",
         "posttrain_losses", "trl_losses", "dtypes")
GRPO = ("posttrain_generation_share", "trl_generation_share", "posttrain_generated_tokens_per_step",
        "trl_generated_tokens_per_step", "posttrain_generated_tokens_per_s", "trl_generated_tokens_per_s",
        "generation_note", "posttrain_first_reward", "trl_first_reward", "max_abs_reward_difference")


def test_gpu_bench_smoke_reports_every_field(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)  # stdout holds the JSON alone
    assert report == json.loads(out.read_text())

    for key in TOP:
        assert key in report, key
    assert report["cuda"] is False and report["device"].startswith("cpu")
    for package in ("torch", "trl", "transformers"):
        assert report["versions"][package], package
    settings = report["settings"]
    for key in SETTINGS:
        assert key in settings, key
    assert settings["smoke"] is True and settings["model"]["hidden"] == 64
    assert settings["peak_tflops"] is None and "CUDA" in settings["peak_tflops_source"]

    workloads = report["workloads"]
    assert set(workloads) == {"dpo-full", "dpo-lora", "grpo-lora", "dpo-full+liger", "dpo-lora+liger",
                              "grpo-lora+liger"}
    for name in ("dpo-full", "dpo-lora", "grpo-lora"):
        entry = workloads[name]
        missing = [k for k in EVERY + (GRPO if name.startswith("grpo") else ()) if k not in entry]
        assert not missing, (name, missing)
        assert entry["workload"] == name and entry["liger"] is False and "error" not in entry
        assert entry["lora"] is name.endswith("lora")
        for side in ("posttrain", "trl"):
            assert entry[f"{side}_median_step_s"] > 0
            assert all(s > 0 for s in entry[f"{side}_step_s_per_repeat"])
            assert entry[f"{side}_tokens_per_s"] > 0
            assert entry[f"{side}_tokens_per_step"] == entry["tokens_per_step_expected"], (name, side)
            assert entry[f"{side}_mfu"] is None and entry[f"{side}_peak_memory_gib"] is None  # CPU
            assert len(entry[f"{side}_losses"]) == settings["steps"]
        assert entry["step_time_ratio"] > 0 and entry["flops_per_step"] > 0
        assert "CUDA" in entry["mfu_note"] and "CUDA" in entry["memory_note"]
        # the same arithmetic on both sides
        assert abs(entry["posttrain_first_loss"] - entry["trl_first_loss"]) < 1e-5, name
        assert entry["first_loss_difference"] < 1e-5, name
        assert entry["max_abs_loss_difference"] < 1e-4, name  # float32 on a CPU: every step agrees
        assert entry["dtypes"]["posttrain"] == entry["dtypes"]["trl"], name
        assert entry["dtypes"]["posttrain"]["trained"] == ["float32"]
        if name.startswith("grpo"):
            assert entry["posttrain_first_reward"] == entry["trl_first_reward"]
            assert entry["posttrain_generated_tokens_per_step"] == entry["trl_generated_tokens_per_step"]
            for side in ("posttrain", "trl"):
                assert 0 < entry[f"{side}_generation_share"] <= 1
                assert entry[f"{side}_generated_tokens_per_s"] > 0
        else:
            pairs, dpo = settings["dpo"]["pairs"], settings["dpo"]
            assert entry["tokens_per_step_expected"] == 2 * pairs * (dpo["prompt_tokens"] + dpo["completion_tokens"])
    assert workloads["dpo-full"]["dtypes"]["trl"]["reference"] is not None  # full FT: a frozen reference copy
    assert workloads["dpo-lora"]["dtypes"]["trl"]["reference"] is None  # LoRA: the adapter-disabled base
    for name in ("dpo-full+liger", "dpo-lora+liger", "grpo-lora+liger"):
        entry = workloads[name]
        assert entry["liger"] is True and "CUDA" in entry["skipped"], name
