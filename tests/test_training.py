"""Real training runs on a tiny random Llama through the CLI: LoRA, 4-bit QLoRA, plain and
conversational data, the run directory, a third-party plugin's hook, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cpu_processes_env, device_batch, free_port, read_jsonl


# Evaluate on examples the run trains on (the first 16 of the same generator): "the loss goes
# down" is then a statement about optimisation, not about generalisation of a random model.
ON_TRAIN = {"eval": {"source": "builtin:arithmetic", "max_examples": 16, "fraction": 0.0}}


def _run(cli, recipe, out_dir, *extra):
    code, out, err = cli("run", recipe, "--output-dir", out_dir, *extra)
    assert code == 0, err
    return json.loads((Path(out_dir) / "summary.json").read_text()), out


@pytest.mark.slow
def test_lora_run_lowers_the_loss_and_fills_the_run_dir(cli, write_recipe, tmp_path):
    recipe = write_recipe(data=ON_TRAIN, plugins={"dpo": {"beta": 0.5}, "verify_gsm8k": {}})
    summary, out = _run(cli, recipe, tmp_path / "run")
    run = tmp_path / "run"
    assert summary["global_step"] == 6
    before, after = summary["before"]["heldout"], summary["after"]["heldout"]
    assert after["loss"] < before["loss"] - 0.01
    assert before["preference_accuracy"] == pytest.approx(0.5)  # policy == reference: every pair ties
    assert after["preference_accuracy"] > 0.5
    assert summary["before"]["answers"]["n"] == 8 and "answer_accuracy" in summary["after"]["answers"]
    assert "held-out preference accuracy" in out and "before" in out and "after" in out
    # run directory
    assert (run / "recipe.yaml").is_file()
    assert (run / "final" / "adapter_config.json").is_file()
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert (run / "final" / "tokenizer_config.json").is_file()
    train_lines = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4, 6]
    assert all("rewards/margins" in r and "logps/chosen" in r for r in train_lines)


@pytest.mark.slow
def test_qlora_4bit_run_lowers_the_loss(cli, write_recipe, tmp_path):
    recipe = write_recipe(data=ON_TRAIN, model={"quantization": {"bits": 4, "quant_type": "nf4"}},
                          plugins={"dpo": {"beta": 0.5}})
    summary, _ = _run(cli, recipe, tmp_path / "run")
    assert summary["after"]["heldout"]["loss"] < summary["before"]["heldout"]["loss"] - 0.01


def test_qlora_base_is_really_4bit(write_recipe, tmp_path):
    import bitsandbytes as bnb
    from posttrain.trainers.preference import build_trainer
    from posttrain.pipeline import load_recipe
    from posttrain.validate import validate

    plan = validate(load_recipe(write_recipe(model={"quantization": {"bits": 4}})))
    trainer, _ = build_trainer(plan, tmp_path)
    layers = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "no 4-bit linear layers in the model"
    assert trainer.ref_model is None


def test_plain_string_data_trains(cli, write_recipe, tmp_path):
    recipe = write_recipe(data={"options": {"n": 64, "conversational": False}, **ON_TRAIN},
                          plugins={"dpo": {"beta": 0.5}})
    summary, _ = _run(cli, recipe, tmp_path / "run")
    assert summary["after"]["heldout"]["loss"] < summary["before"]["heldout"]["loss"]


def test_local_jsonl_with_column_mapping_trains(cli, write_recipe, tmp_path):
    rows = [{"question": f"What is {i} + 1?", "good": f"{i + 1}", "bad": f"{i + 2}"} for i in range(40)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(data={"source": str(data), "options": {},
                                "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}},
                          training={"max_steps": 2})
    summary, _ = _run(cli, recipe, tmp_path / "run")
    assert summary["global_step"] == 2 and summary["heldout_examples"] == 10


def test_full_finetuning_keeps_a_frozen_reference(write_recipe, tmp_path):
    from posttrain.trainers.preference import build_trainer
    from posttrain.pipeline import load_recipe
    from posttrain.validate import validate

    plan = validate(load_recipe(write_recipe(model={"lora": None}, training={"max_steps": 2})))
    trainer, _ = build_trainer(plan, tmp_path)
    ref_before = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
    trainer.train()
    assert all((trainer.ref_model.state_dict()[k] == v).all() for k, v in ref_before.items())
    changed = any((p != trainer.ref_model.get_parameter(n)).any() for n, p in trainer.model.named_parameters())
    assert changed


def test_third_party_plugin_hook_is_called_in_a_run(cli, write_recipe, tmp_path, third_party):
    recipe = write_recipe(plugins={"dpo": {}, "acme_metrics": {"label": "seen"}},
                          training={"max_steps": 3, "logging_steps": 1})
    _run(cli, recipe, tmp_path / "run")
    lines = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    counts = [r["acme/seen"] for r in lines]  # the plugin counts its own calls, one per batch
    assert len(counts) == 3 and counts[0] >= 1 and all(b == a + 1 for a, b in zip(counts, counts[1:]))


def test_plugin_raising_during_training_exits_2_naming_it(cli, write_recipe, tmp_path, third_party):
    recipe = write_recipe(plugins={"dpo": {}, "acme_explode": {"where": "loss"}}, training={"max_steps": 2})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 2
    assert "plugin 'acme_explode' failed in hook 'posttrain_loss_terms': RuntimeError: boom in loss terms" in err


def test_existing_run_dir_is_not_overwritten(cli, write_recipe, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    code, _, err = cli("run", write_recipe(), "--output-dir", run)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (run / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in run.iterdir()) == ["precious.txt"]


def test_errors_leave_an_existing_run_alone(cli, write_recipe, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    code, _, err = cli("run", write_recipe(plugins={"dpoo": {}}), "--output-dir", run, "--overwrite")
    assert code == 2 and "unknown plugin" in err
    assert (run / "precious.txt").read_text() == "keep me"


def test_resume_refuses_a_changed_recipe(cli, write_recipe, tmp_path):
    recipe = write_recipe(training={"max_steps": 1}, eval={"generate": 0})
    run = tmp_path / "run"
    (run).mkdir()
    (run / "recipe.yaml").write_text("name: other\n")
    code, _, err = cli("run", recipe, "--output-dir", run, "--resume")
    assert code == 2 and "differs from the one the run started with" in err


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_step_count(write_recipe, tmp_path, third_party):
    run = tmp_path / "run"
    marker = tmp_path / "killed.marker"
    recipe = write_recipe(plugins={"dpo": {}, "acme_killer": {"at_step": 5, "marker": str(marker)}},
                          training={"max_steps": 8, "save_steps": 2, "logging_steps": 1}, eval={"generate": 0})
    cmd = [sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--output-dir", str(run)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert marker.exists() and not (run / "summary.json").exists()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=os.environ.copy())
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 8 and summary["resumed_from"] == "checkpoint-4"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{i}" for i in (2, 4, 6, 8)]
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9))  # each step logged once: the lines after checkpoint-4 were not kept twice


def test_qlora_gradients_are_the_same_after_an_evaluation(write_recipe, tmp_path):
    """bitsandbytes repacks 4-bit weights for an inference-only CPU kernel (no backward) the first
    time a layer runs in eval mode; training after the before-evaluation must still get the same
    gradients as training before it."""
    import bitsandbytes as bnb
    from posttrain.trainers.preference import build_trainer
    from posttrain.pipeline import load_recipe
    from posttrain.validate import validate

    plan = validate(load_recipe(write_recipe(model={"quantization": {"bits": 4}})))
    trainer, _ = build_trainer(plan, tmp_path)
    batch = device_batch(trainer)

    def grads():
        trainer.model.train()
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, dict(batch)).backward()
        return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    before = grads()
    trainer.evaluate()
    after = grads()
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert before.keys() == after.keys() and len(before) > 0
    for name in before:
        assert torch.allclose(before[name].float(), after[name].float(), atol=1e-6), name


@pytest.mark.slow
def test_batching_and_reference_hooks_take_part_in_a_run(cli, write_recipe, tmp_path, third_party):
    import acme_posttrain

    acme_posttrain.AcmeHooks.calls.clear()
    recipe = write_recipe(plugins={"dpo": {}, "acme_hooks": {}}, training={"max_steps": 3, "logging_steps": 1},
                          eval={"generate": 0})
    summary, _ = _run(cli, recipe, tmp_path / "run")
    calls = acme_posttrain.AcmeHooks.calls
    assert calls["transform_dataset:train"] == 1 and calls["transform_dataset:eval"] == 1
    assert calls["data_collator"] == 1 and calls["train_sampler"] >= 1
    assert calls["update_reference:step"] == 3
    assert calls["token_mask"] >= 3 and calls["collate"] >= 3
    assert summary["heldout_examples"] == 24 - 1  # the transform dropped one held-out example
    # every response lost its first token to the mask: lengths agree with the tokenised data minus one
    import yaml
    from posttrain.trainers.preference import build_trainer
    from posttrain.pipeline import recipe_from_data
    from posttrain.validate import validate

    plan = validate(recipe_from_data(yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())))
    trainer, _ = build_trainer(plan, tmp_path / "again")
    batch = device_batch(trainer)
    masked = trainer._apply_token_masks(dict(batch))["completion_mask"]
    assert (masked.sum(dim=1) == batch["completion_mask"].sum(dim=1) - 1).all()


@pytest.mark.slow
def test_8bit_base_with_lora_trains(cli, write_recipe, tmp_path):
    recipe = write_recipe(data=ON_TRAIN, model={"quantization": {"bits": 8}}, plugins={"dpo": {"beta": 0.5}})
    summary, _ = _run(cli, recipe, tmp_path / "run")
    assert summary["after"]["heldout"]["loss"] < summary["before"]["heldout"]["loss"]


@pytest.mark.slow
def test_deepspeed_bf16_keeps_float32_master_weights(write_recipe, tmp_path, tiny_model_dir):
    """Under DeepSpeed with bf16 the engine holds the module in bf16 and its ZeRO optimizer keeps a
    float32 master copy: tiny updates (lr 1e-6) survive there, as in posttrain's own mixed precision.
    Read back from the ZeRO checkpoint's float32 partitions (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    ds_config = {
        "zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                   "weight_decay": "auto", "torch_adam": True}},
    }
    recipe = write_recipe("ds-bf16", model={"lora": None, "dtype": "bfloat16"},
                          training={"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-6,
                                    "lr_scheduler_type": "constant", "save_steps": 3, "deepspeed": ds_config},
                          eval={"generate": 0, "before": False}, data={"eval": {"fraction": 0.0}})
    ds = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "bf16", "--dynamo_backend", "no", "--use_deepspeed", "--main_process_ip", "127.0.0.1",
         "--main_process_port", free_port(), "-m", "posttrain.cli", "run", str(recipe), "--output-dir",
         str(tmp_path / "run")], capture_output=True, text=True, env=cpu_processes_env(), timeout=900)
    assert ds.returncode == 0, ds.stderr[-3000:]
    masters = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "run" / "checkpoint-3"))
    start = load_file(tiny_model_dir / "model.safetensors")
    # DeepSpeed casts the module to bf16 first and builds its float32 masters from those values
    moved = sum(int((masters[n].float() != start[n].to(torch.bfloat16).float()).sum()) for n in start)
    total = sum(t.numel() for t in start.values())
    assert all(t.dtype == torch.float32 for t in masters.values())
    assert moved / total > 0.5, moved / total
    # the bf16 module the engine computes with (saved as the final model) moved far less: without the
    # master copy those updates would have been lost
    module = load_file(tmp_path / "run" / "final" / "model.safetensors")
    module_moved = sum(int((module[n].float() != start[n].to(torch.bfloat16).float()).sum()) for n in start)
    assert {t.dtype for t in module.values()} == {torch.bfloat16}
    assert module_moved < 0.1 * moved
