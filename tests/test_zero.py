"""Every stage under DeepSpeed ZeRO-3 and ZeRO-2 (accelerate launch, two CPU processes over gloo, the tiny
model): one pipeline runs sft, reward_model, preference (LoRA from the sft stage's model, and full
fine-tuning with its frozen reference), kto, online (GRPO, and PPO with a reward model and a critic from the
reward_model stage), iterative DPO (two rounds, the reference moved to the policy), rejection sampling and
distillation (the sft stage's model as the teacher), each stage passing its model on. The same pipeline under plain DDP (torchrun) is the reference: each
stage's losses and gradient norms, the iterative rounds' pairs and the rejection-sampling dataset are the
same; the engine really shards (a probe plugin reads the parameters each process holds); every final/
loads with transformers and peft as a one-process run's does, and generates.

The ZeRO-3 run is launched as two "machines" on loopback (one process each), so it also shows that
several machines train with the losses of one machine's two processes.

Also: batch arithmetic DeepSpeed would refuse is refused by ``posttrain validate`` (exit 2), and PPO with
the critic resumes under ZeRO-3 with the losses of an uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cpu_processes_env, free_port, read_jsonl

pytestmark = pytest.mark.slow  # every stage under DeepSpeed ZeRO-2/3 in two CPU processes

TESTS = Path(__file__).resolve().parent
PREEMPTED = 75

WORDS = {"source": "builtin:word_problems", "options": {"n": 24}, "eval": {"fraction": 0.2}}
ARITH = {"source": "builtin:arithmetic", "options": {"n": 48}, "eval": {"fraction": 0.25}}
STEPS = {"per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1, "save_strategy": "no",
         "learning_rate": 0.01}
ONLINE = {**STEPS, "max_completion_length": 8}
DIGITS = {"online_plugins:DigitShare": {}}


def zero_config(stage: int) -> dict:
    return {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                       "weight_decay": "auto", "torch_adam": True}}}


def pipeline(tiny_model_dir, probe: Path, zero: int | None) -> dict:
    probe_plugin = {"engine_plugins:EngineProbe": {"out": str(probe)}}
    stages = [
        {"name": "sft", "stage": "sft", "data": {**ARITH, "columns": {"completion": "chosen"}},
         "plugins": {"verify_gsm8k": {}}, "training": {**STEPS, "max_length": 64}},
        {"name": "rm", "stage": "reward_model", "data": ARITH, "plugins": {}, "training": {**STEPS, "max_length": 64}},
        {"name": "dpo", "stage": "preference", "model": {"name_or_path": "stages.sft"}, "data": ARITH,
         "plugins": {"dpo": {}, "verify_gsm8k": {}}, "training": {**STEPS, "max_length": 64}},
        {"name": "dpo_full", "stage": "preference", "model": {"name_or_path": "stages.sft", "lora": None},
         "data": ARITH, "plugins": {"dpo": {}, "verify_gsm8k": {}}, "training": {**STEPS, "max_length": 64}},
        {"name": "kto", "stage": "kto", "data": ARITH, "plugins": {"verify_gsm8k": {}},
         "training": {**STEPS, "max_length": 64}},
        {"name": "grpo", "stage": "online", "data": WORDS,
         "plugins": {**DIGITS, "group_relative": {}, "advantage_norm": {"scope": "group"}},
         "training": {**ONLINE, "num_generations": 4}},
        {"name": "ppo", "stage": "online", "model": {"name_or_path": "stages.sft"}, "data": WORDS,
         "plugins": {"reward_model": {"model": "stages.rm"}, "critic": {"model": "stages.rm"}, "gae": {},
                     "advantage_norm": {}},
         "training": {**ONLINE, "beta": 0.05, "num_generations": 1}},
        {"name": "iter", "stage": "iterative", "data": WORDS, "plugins": {"dpo": {}, **DIGITS, "ref_to_latest": {}},
         "training": {**STEPS, "max_length": 512}, "rounds": 2,
         "sampling": {"samples": 3, "prompts": 4, "max_new_tokens": 6}},
        {"name": "iter_full", "stage": "iterative", "model": {"lora": None}, "data": WORDS,
         "plugins": {"dpo": {}, **DIGITS, "ref_to_latest": {}}, "training": {**STEPS, "max_length": 512},
         "rounds": 2, "sampling": {"samples": 3, "prompts": 4, "max_new_tokens": 6}},
        {"name": "rs", "stage": "rejection_sampling", "model": {"name_or_path": "stages.iter", "lora": None},
         "data": {**WORDS, "eval": {"fraction": 0.0}}, "plugins": DIGITS,
         "sampling": {"samples": 2, "prompts": 4, "max_new_tokens": 4}, "eval": {"generate": 0}},
        # the other critic: a LoRA adapter and a value head on the policy's own base (inside the policy's engine)
        {"name": "ppo_lora_critic", "stage": "online", "model": {"name_or_path": "stages.sft"}, "data": WORDS,
         "plugins": {**DIGITS, "critic": {}, "gae": {}, "advantage_norm": {}},
         "training": {**ONLINE, "beta": 0.05, "num_generations": 1}},
        # full fine-tuning with no reference model at all (a reference-free loss): no frozen copy is built
        {"name": "simpo_full", "stage": "preference", "model": {"name_or_path": "stages.sft", "lora": None},
         "data": ARITH, "plugins": {"simpo": {}}, "training": {**STEPS, "max_length": 64}},
        # on-policy distillation of the sft stage's model into the start model (the teacher sharded as the student)
        {"name": "distil", "stage": "distillation", "teacher": "stages.sft", "data": WORDS, "plugins": {},
         "training": {**ONLINE, "beta": 0.5}},
    ]
    for stage in stages:
        stage.setdefault("eval", {"generate": 2, "max_new_tokens": 4})
        if "training" in stage:
            stage["plugins"] = {**stage["plugins"], **probe_plugin}
            if zero is not None:
                stage["training"]["deepspeed"] = zero_config(zero)
    return {"name": "every-stage", "seed": 42,
            "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "stages": stages}


def _env():
    return cpu_processes_env(PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))


def accelerate(*args, deepspeed: bool, machines: int = 1, rank: int = 0, port: str | None = None,
               processes: int = 2, timeout: int = 900):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                "--num_machines", str(machines), "--machine_rank", str(rank), "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port",
                port or free_port()]
    if deepspeed:
        launcher += ["--use_deepspeed", *(["--deepspeed_multinode_launcher", "standard"] if machines > 1 else [])]
    else:  # accelerate's data-parallel launcher (torchrun's), which also runs CPU processes
        launcher += ["--multi_gpu"]
    return [*launcher, "-m", "posttrain.cli", *map(str, args)]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", free_port(), "-m", "posttrain.cli", *map(str, args)]


def run(cmd, timeout=900):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def steps(run_dir: Path, keys=("loss", "grad_norm")) -> list[tuple]:
    return [tuple(r.get(k) for k in keys) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def same_steps(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b) and a, (a, b)
    for x, y in zip(a, b, strict=True):
        # the loss: ZeRO-3 gathers and reduces in another order than DDP (2e-5 apart after an iterative round)
        assert x[0] == pytest.approx(y[0], rel=1e-4, abs=1e-5), (a, b)
        for u, v in zip(x[1:], y[1:], strict=True):  # gradient norms (and the critic's value loss)
            assert u == pytest.approx(v, rel=2e-4, abs=1e-6), (a, b)


def two_machines(*args, deepspeed: bool) -> None:
    """Two launches on this machine as two machines of one process each (loopback rendezvous)."""
    port = free_port()
    machines = [subprocess.Popen(accelerate(*args, deepspeed=deepspeed, machines=2, rank=rank, port=port),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
                for rank in (0, 1)]
    for proc in machines:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]


@pytest.fixture(scope="module")
def every_stage(tmp_path_factory, tiny_model_dir):
    """The pipeline run three times, two processes each: plain DDP (torchrun), ZeRO-2 (accelerate launch) and
    ZeRO-3 launched as two machines (accelerate launch --num_machines 2, one process each, on loopback)."""
    root = tmp_path_factory.mktemp("every-stage")
    runs = {}
    for name, zero in (("ddp", None), ("zero2", 2), ("zero3", 3)):
        recipe = root / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(pipeline(tiny_model_dir, root / f"{name}-probe.jsonl", zero), sort_keys=False))
        out = root / name
        if zero is None:
            (root / "ddp-stdout.txt").write_text(run(torchrun("run", recipe, "--output-dir", out)).stdout)
        elif zero == 2:
            run(accelerate("run", recipe, "--output-dir", out, deepspeed=True))
        else:
            two_machines("run", recipe, "--output-dir", out, deepspeed=True)
        runs[name] = out
    return root, runs


TRAINED = ("01-sft", "02-rm", "03-dpo", "04-dpo_full", "05-kto", "06-grpo", "07-ppo", "08-iter", "09-iter_full",
           "11-ppo_lora_critic", "12-simpo_full", "13-distil")
PPO = ("07-ppo", "11-ppo_lora_critic")


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_every_stage_gives_the_losses_of_ddp(every_stage, zero, tiny_model_dir):
    _, runs = every_stage
    for stage in TRAINED:
        keys = ("loss", "grad_norm", "critic/value_loss", "critic/grad_norm") if stage in PPO else ("loss", "grad_norm")
        ours, ddp = steps(runs[zero] / stage, keys), steps(runs["ddp"] / stage, keys)
        assert ours[-1][0] != pytest.approx(ours[0][0], abs=1e-7) or stage in ("06-grpo", *PPO), stage
        same_steps(ours, ddp)
        summary = json.loads((runs[zero] / stage / "summary.json").read_text())
        if stage not in ("08-iter", "09-iter_full"):  # (an iterative summary lists its rounds instead)
            assert summary["world_size"] == 2
            assert ("final_model_from" in summary) == (zero == "zero3"), stage  # says where final/ came from
    for stage in ("08-iter", "09-iter_full"):
        for r in ("round-01", "round-02"):  # every rank sampled its share: the same pairs as under DDP
            assert (runs[zero] / stage / r / "pairs.jsonl").read_text() == \
                (runs["ddp"] / stage / r / "pairs.jsonl").read_text()
        # ref_to_latest moved the reference (the adapter, or the frozen copy) to the policy after round 1:
        # round 2 starts at DPO's loss for a policy equal to its reference
        round_two = [r for r in read_jsonl(runs[zero] / stage / "metrics.jsonl") if "loss" in r and r["round"] == 2]
        assert round_two[0]["loss"] == pytest.approx(0.6931472, abs=1e-6), stage
    from safetensors.torch import load_file

    reference = "09-iter_full/round-01/reference/model.safetensors"  # under ZeRO-3 gathered from its shards
    ours, ddp, start = (load_file(runs[zero] / reference), load_file(runs["ddp"] / reference),
                        load_file(tiny_model_dir / "model.safetensors"))
    moved = max(float((ddp[k] - start[k]).abs().max()) for k in ddp)  # round 1 moved it (to the policy)
    assert ours.keys() == ddp.keys() and moved > 1e-3
    assert max(float((ours[k] - ddp[k]).abs().max()) for k in ours) < 0.2 * moved
    assert (runs[zero] / "10-rs" / "dataset.jsonl").read_text() == (runs["ddp"] / "10-rs" / "dataset.jsonl").read_text()


def test_rank_zero_alone_writes_and_prints(every_stage):
    """Under every launch rank 0 alone owns the run directory: one line per logged step, one closing table."""
    root, runs = every_stage
    assert (root / "ddp-stdout.txt").read_text().count("pipeline 'every-stage' finished") == 1
    for name in ("ddp", "zero2", "zero3"):
        for stage in TRAINED[:7]:
            assert [r["step"] for r in read_jsonl(runs[name] / stage / "metrics.jsonl") if "loss" in r] == [1, 2]


def test_zero3_shards_every_trained_model_and_zero2_none(every_stage):
    root, _ = every_stage
    for zero, expect_sharded in (("zero3", True), ("zero2", False), ("ddp", False)):
        records = read_jsonl(root / f"{zero}-probe.jsonl")
        # one record per process and train() call: 10 stages, the two iterative ones twice (a new engine per round)
        assert len(records) == 2 * 14, records
        assert {r["rank"] for r in records} == {0, 1}
        for r in records:
            assert r["zero_stage"] == {"zero3": 3, "zero2": 2, "ddp": None}[zero]
            if expect_sharded:
                assert r["sharded"] == r["parameters"] and r["trainable_sharded"] > 0, r
            else:
                assert r["sharded"] == 0, r
        # the value model critic is a DeepSpeed engine of its own, with the policy's ZeRO stage
        facts = json.loads((root / zero / "07-ppo" / "summary.json").read_text()).get("critic_engine")
        if zero == "ddp":
            assert facts is None
        else:
            assert facts["zero_stage"] == {"zero3": 3, "zero2": 2}[zero], facts
            assert facts["sharded"] == (facts["parameters"] if expect_sharded else 0), facts
            assert not expect_sharded or facts["trainable_sharded"] > 0, facts


def test_final_models_load_and_generate(every_stage, tiny_model_dir):
    import torch
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, runs = every_stage
    start = load_file(tiny_model_dir / "model.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer("1 + 2 =", return_tensors="pt")
    for zero in ("zero2", "zero3"):
        run_dir = runs[zero]
        full = AutoModelForCausalLM.from_pretrained(run_dir / "04-dpo_full" / "final")
        for stage in ("04-dpo_full", "12-simpo_full"):
            ddp_full = load_file(runs["ddp"] / stage / "final" / "model.safetensors")
            saved = load_file(run_dir / stage / "final" / "model.safetensors")
            assert saved.keys() == ddp_full.keys() and all(saved[k].shape == ddp_full[k].shape for k in saved)
            assert max(float((saved[k] - ddp_full[k]).abs().max()) for k in saved) < 1e-3, stage
            assert any(not torch.equal(saved[k], start[k]) for k in start if k in saved), stage  # the weights moved
        for stage in ("01-sft", "03-dpo", "05-kto", "06-grpo", "07-ppo", "08-iter", "13-distil"):
            adapter = load_file(run_dir / stage / "final" / "adapter_model.safetensors")
            reference = load_file(runs["ddp"] / stage / "final" / "adapter_model.safetensors")
            assert adapter.keys() == reference.keys()
            assert max(float((adapter[k] - reference[k]).abs().max()) for k in adapter) < 2e-2, stage
            assert any(float(t.abs().sum()) > 0 for k, t in adapter.items() if "lora_B" in k), stage
        for model in (full, AutoPeftModelForCausalLM.from_pretrained(run_dir / "03-dpo" / "final")):
            out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            assert out.shape[1] == prompt["input_ids"].shape[1] + 4
        scorer = AutoPeftModelForSequenceClassification.from_pretrained(run_dir / "02-rm" / "final", num_labels=1)
        assert scorer(**prompt).logits.shape == (1, 1)


@pytest.mark.parametrize("training, message", [
    ({"deepspeed": {"zero_optimization": {"stage": 4}}}, "zero_optimization.stage must be one of 0, 1, 2, 3"),
    ({"deepspeed": {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}},
     "final/ would hold ZeRO shards"),
    ({"per_device_train_batch_size": 4, "deepspeed": {"zero_optimization": {"stage": 3},
                                                      "train_micro_batch_size_per_gpu": 2}},
     "train_micro_batch_size_per_gpu is 2 but training.per_device_train_batch_size is 4"),
    ({"gradient_accumulation_steps": 2, "deepspeed": {"gradient_accumulation_steps": 4}},
     "gradient_accumulation_steps is 4 but training.gradient_accumulation_steps is 2"),
    ({"per_device_train_batch_size": 4, "deepspeed": {"train_batch_size": 6}},
     "train_batch_size is 6, which is not per_device_train_batch_size 4 x gradient_accumulation_steps 1"),
])
def test_batch_arithmetic_deepspeed_refuses_is_refused_by_validate(cli, write_recipe, training, message):
    code, _, err = cli("validate", write_recipe(training=training))
    assert code == 2 and message in err and "training.deepspeed" in err, err


def test_train_batch_size_is_checked_against_the_launch(cli, write_recipe, monkeypatch):
    recipe = write_recipe(training={"per_device_train_batch_size": 4, "deepspeed": {"train_batch_size": 16}})
    code, _, err = cli("validate", recipe)
    assert code == 0, err  # four processes would make 16; without a launch that is not known
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli("validate", recipe)
    assert code == 2 and "this launch's 2 processes" in err, err


@pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="FSDP is refused only where accelerate cannot run it")
@pytest.mark.parametrize("how", ["launcher", "recipe"])
def test_fsdp_on_cpu_processes_is_refused_before_the_model_loads(cli, write_recipe, tmp_path, monkeypatch, how):
    """accelerate runs CPU processes as plain DDP even when FSDP is asked for: posttrain says so (exit 2, the
    launcher flag or the recipe field named) instead of training with whole models under FSDP's name."""
    if how == "launcher":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch --use_fsdp sets
        recipe, field = write_recipe(), "accelerate launch --use_fsdp"
    else:
        recipe, field = write_recipe(training={"fsdp": "full_shard"}), "training.fsdp"
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 2 and f"{field}: FSDP was asked for, and this machine has no GPU" in err, err
    assert "zero_optimization.stage 3" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_ppo_with_the_critic_resumes_under_zero3(online_recipe, tmp_path, tiny_model_dir):
    """A signal to one rank of a ZeRO-3 PPO run with a value model critic: both stop after the same step;
    --resume continues the policy and the critic (each its own engine's ZeRO checkpoint, a shard per process)
    with the losses of an uninterrupted run."""
    critic = {"model": str(tiny_model_dir), "lora_r": 0}  # a new value head on the tiny model, all weights trained
    common = {"plugins": {"online_plugins:DigitShare": {}, "critic": critic, "gae": {}, "advantage_norm": {}},
              "training": {"beta": 0.05, "num_generations": 2, "per_device_train_batch_size": 4, "max_steps": 3,
                           "save_steps": 1, "save_strategy": "steps", "deepspeed": zero_config(3)},
              "eval": {"generate": 0, "before": False}}
    whole = online_recipe("whole", **common)
    run(accelerate("run", whole, "--output-dir", tmp_path / "whole", deepspeed=True))
    stopped = online_recipe("stopped", **{**common, "plugins": {**common["plugins"],
                                                                "trust_plugins:SignalAt": {"step": 2, "rank": 1}}})
    out = tmp_path / "run"
    proc = subprocess.run(accelerate("run", stopped, "--output-dir", out, deepspeed=True), capture_output=True,
                          text=True, env=_env(), timeout=900)
    assert proc.returncode != 0 and "SIGTERM received (rank 1)" in proc.stderr, proc.stderr[-3000:]
    assert json.loads((out / "preempted.json").read_text())["step"] == 2
    shards = out / "checkpoint-2" / "critic" / "critic"
    assert {f.name for f in shards.glob("zero_pp_rank_*optim_states.pt")} == \
        {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}, list(shards.iterdir())
    run(accelerate("run", stopped, "--output-dir", out, "--resume", deepspeed=True))
    keys = ("loss", "grad_norm", "critic/value_loss", "critic/grad_norm")
    same_steps(steps(out, keys), steps(tmp_path / "whole", keys))


def test_two_machines_on_loopback_train_as_one_machine(every_stage):
    """The ZeRO-3 pipeline ran as two machines (accelerate launch --num_machines 2 --machine_rank 0|1 with
    DeepSpeed's standard multi-node launcher, one process each): every stage, the preference and online
    ones included, has world size 2 and the losses of one machine's two processes (the DDP run)."""
    _, runs = every_stage
    for stage in ("03-dpo", "06-grpo", "07-ppo"):
        summary = json.loads((runs["zero3"] / stage / "summary.json").read_text())
        assert summary["world_size"] == 2
        same_steps(steps(runs["zero3"] / stage), steps(runs["ddp"] / stage))
