"""Pipelines (several stages, each from the previous one's output) and the reward_model reward source,
on a tiny random Llama: the DPO reference after an SFT stage is the SFT model, a QLoRA stage is
dequantised and merged, a pipeline killed in its second stage resumes without re-running the first,
--from restarts at a stage, every validation error names the stage, `posttrain compare` reads a
pipeline directory, and the reward_model plugin scores as a direct forward of the model does."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import device_batch, read_jsonl

pytestmark = pytest.mark.slow  # pipelines: several stages, some in two processes

QUICK = {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "max_steps": 3, "logging_steps": 1,
         "save_strategy": "no", "learning_rate": 5e-3, "max_length": 64}
SFT_DATA = {"source": "builtin:arithmetic", "options": {"n": 48}, "columns": {"completion": "chosen"},
            "eval": {"fraction": 0.25}}
PAIRS = {"source": "builtin:arithmetic", "options": {"n": 48}, "eval": {"fraction": 0.25}}


def pipeline_recipe(tmp_path, tiny_model_dir, stages, name="p", model=None, **top) -> Path:
    data = {"name": name, "model": model or {"name_or_path": str(tiny_model_dir),
                                             "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "stages": stages, **top}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sft_then_dpo(**dpo):
    return [{"name": "sft", "stage": "sft", "data": SFT_DATA, "plugins": {}, "training": QUICK,
             "eval": {"generate": 0}},
            {"name": "dpo", "stage": "preference", "data": PAIRS, "plugins": {"dpo": {}},
             "training": {**QUICK, **dpo.pop("training", {})}, "eval": {"generate": 0}, **dpo}]


def test_pipeline_runs_each_stage_from_the_last_and_summarises(cli, tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    code, out, err = cli("run", pipeline_recipe(tmp_path, tiny_model_dir, sft_then_dpo()), "--output-dir", run)
    assert code == 0, err
    assert (run / "01-sft" / "merged" / "config.json").is_file() and (run / "02-dpo" / "final").is_dir()
    stage2 = yaml.safe_load((run / "02-dpo" / "recipe.yaml").read_text())
    assert stage2["model"]["name_or_path"] == str((run / "01-sft" / "merged").resolve())
    summary = json.loads((run / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["sft", "dpo"]
    assert summary["stages"][0]["before"]["heldout"]["completion_nll"] > 0
    assert summary["stages"][1]["after"]["heldout"]["preference_accuracy"] is not None
    assert all(s["seconds"] > 0 for s in summary["stages"])
    assert "01-sft (sft, 3 steps" in out and "02-dpo (preference, 3 steps" in out
    # posttrain compare reads a pipeline directory as its stages
    code, out, err = cli("compare", run, "--output", tmp_path / "cmp.png")
    assert code == 0, err
    assert "01-sft" in out and "02-dpo" in out and (tmp_path / "cmp.png").is_file()


def test_two_process_pipeline_merges_once_and_the_next_stage_starts_from_it(tmp_path, tiny_model_dir):
    """SFT then DPO under torchrun with two CPU processes (gloo): rank 0 alone merges the SFT stage
    and writes the summaries, the other rank waits for the merged model before the DPO stage loads
    it, and both ranks train every stage in step."""
    from conftest import cpu_processes_env, free_port

    run = tmp_path / "run"
    recipe = pipeline_recipe(tmp_path, tiny_model_dir, sft_then_dpo())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", free_port(), "-m", "posttrain.cli", "run", str(recipe), "--output-dir", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cpu_processes_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert [(s["name"], s["global_step"]) for s in summary["stages"]] == [("sft", 3), ("dpo", 3)]
    assert proc.stdout.count("pipeline 'p' finished") == 1  # printed by rank 0 only
    stage2 = yaml.safe_load((run / "02-dpo" / "recipe.yaml").read_text())
    assert stage2["model"]["name_or_path"] == str((run / "01-sft" / "merged").resolve())
    for stage in ("01-sft", "02-dpo"):
        assert json.loads((run / stage / "summary.json").read_text())["world_size"] == 2
    assert (run / "02-dpo" / "merged" / "config.json").is_file()


def _logps(model, batch):
    """Summed log-probs of the completion tokens, computed by hand from the model's logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token * batch["completion_mask"][:, 1:]).sum(1)


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_dpo_reference_after_sft_is_the_sft_model(cli, tmp_path, tiny_model_dir, quantized):
    """The trap other tools fall into: with LoRA, the implicit reference of a DPO stage that follows an
    SFT stage must be the SFT model, not the base model."""
    from posttrain.pipeline import recipe_from_data
    from posttrain.trainers.preference import build_trainer
    from posttrain.validate import validate
    from transformers import AutoModelForCausalLM

    model = {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "dtype": "float32"}
    if quantized:
        model["quantization"] = {"bits": 4}
    stages = sft_then_dpo()[:1]
    stages[0]["training"] = {**QUICK, "max_steps": 6, "learning_rate": 2e-2}
    run = tmp_path / "run"
    code, _, err = cli("run", pipeline_recipe(tmp_path, tiny_model_dir, stages, model=model), "--output-dir", run)
    assert code == 0, err
    merged = run / "01-sft" / "merged"
    # the DPO stage as the pipeline builds it: from the merged SFT weights, with a fresh adapter
    dpo = {"name": "dpo", "stage": "preference", "model": {**model, "name_or_path": str(merged)}, "data": PAIRS,
           "plugins": {"dpo": {}}, "training": QUICK, "eval": {"generate": 0}}
    trainer, _ = build_trainer(validate(recipe_from_data(dpo)), tmp_path / "dpo")
    batch = device_batch(trainer)
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    reference = torch.cat([ref_chosen, ref_rejected])
    device = batch["input_ids"].device
    sft = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).to(device).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(device).eval()
    atol = 2e-2 if quantized else 1e-4  # 4-bit matmuls differ from the dequantised float ones a little
    assert torch.allclose(reference, _logps(sft, batch), atol=atol)
    assert (reference - _logps(base, batch)).abs().max() > 10 * atol  # and not the base model's


def test_qlora_stage_is_dequantised_then_merged(tmp_path, tiny_model_dir, cli):
    """merged/ holds the adapter merged into the dequantised 4-bit base: the weights the adapter was trained
    against, so the merged model computes what the trained 4-bit model + adapter computes."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from posttrain.models import keep_4bit_layout_trainable
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
             "quantization": {"bits": 4}, "dtype": "float32"}
    stages = sft_then_dpo()[:1]
    stages[0]["training"] = {**QUICK, "learning_rate": 2e-2}
    run = tmp_path / "run"
    code, _, err = cli("run", pipeline_recipe(tmp_path, tiny_model_dir, stages, model=model), "--output-dir", run)
    assert code == 0, err
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=q),
                                        run / "01-sft" / "final").eval()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trained.modules())
    keep_4bit_layout_trainable(trained)  # compute as training did (not bitsandbytes' bf16 CPU inference kernel)
    merged = AutoModelForCausalLM.from_pretrained(run / "01-sft" / "merged").eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    device = next(trained.parameters()).device  # bitsandbytes may have put the 4-bit model on a GPU
    with torch.no_grad():
        a, b = trained(input_ids=ids.to(device)).logits.cpu(), merged.to(device)(input_ids=ids.to(device)).logits.cpu()
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_pipeline_killed_in_its_second_stage_resumes_without_rerunning_the_first(tmp_path, tiny_model_dir,
                                                                                third_party):
    marker = tmp_path / "killed.marker"
    stages = sft_then_dpo(training={"max_steps": 6, "save_strategy": "steps", "save_steps": 2})
    stages[1]["plugins"] = {"dpo": {}, "acme_killer": {"at_step": 3, "marker": str(marker)}}
    recipe = pipeline_recipe(tmp_path, tiny_model_dir, stages)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--output-dir", str(run)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert (run / "01-sft" / "summary.json").is_file() and not (run / "02-dpo" / "summary.json").exists()
    sft_files = {p: p.stat().st_mtime_ns for p in (run / "01-sft").rglob("*") if p.is_file()}
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage 01-sft finished earlier" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (run / "01-sft").rglob("*") if p.is_file()} == sft_files
    dpo = json.loads((run / "02-dpo" / "summary.json").read_text())
    assert dpo["global_step"] == 6 and dpo["resumed_from"] == "checkpoint-2"
    assert [r["step"] for r in read_jsonl(run / "02-dpo" / "metrics.jsonl") if "loss" in r] == list(range(1, 7))
    assert json.loads((run / "summary.json").read_text())["stages"][1]["global_step"] == 6


def test_from_restarts_a_stage_keeping_the_earlier_outputs(cli, tmp_path, tiny_model_dir):
    recipe = pipeline_recipe(tmp_path, tiny_model_dir, sft_then_dpo())
    run = tmp_path / "run"
    assert cli("run", recipe, "--output-dir", run)[0] == 0
    sft_files = {p: p.stat().st_mtime_ns for p in (run / "01-sft").rglob("*") if p.is_file()}
    old = json.loads((run / "02-dpo" / "summary.json").read_text())
    code, _, err = cli("run", recipe, "--output-dir", run, "--from", "dpo", "--set", "stages.dpo.plugins.dpo.beta=0.5")
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in (run / "01-sft").rglob("*") if p.is_file()} == sft_files
    new = yaml.safe_load((run / "02-dpo" / "recipe.yaml").read_text())
    assert new["plugins"]["dpo"]["beta"] == 0.5 and old != json.loads((run / "02-dpo" / "summary.json").read_text())
    # an earlier stage's recipe may not change under --from (its output is kept)
    code, _, err = cli("run", recipe, "--output-dir", run, "--from", "dpo", "--set", "stages.sft.training.max_steps=4")
    assert code == 2 and "sft" in err and "--from" in err
    # a finished pipeline is not resumed, and a changed one is not continued
    code, _, err = cli("run", recipe, "--output-dir", run, "--resume")
    assert code == 2 and "already finished" in err


@pytest.mark.parametrize("stages, field, message", [
    ([{"name": "sft", "stage": "sft", "data": SFT_DATA}, {"name": "dpo", "stage": "preference", "data": PAIRS,
                                                         "plugins": {"dpo": {"beta": -1}}}],
     "stages[1].plugins.dpo.beta", "beta must be positive"),
    ([{"name": "sft", "stage": "sft", "data": SFT_DATA, "model": {"name_or_path": "stages.rm"}},
      {"name": "rm", "stage": "reward_model", "data": PAIRS}], "stages[0].model.name_or_path", "runs later"),
    ([{"name": "sft", "stage": "sft", "data": SFT_DATA},
      {"name": "rl", "stage": "online", "data": {"source": "builtin:word_problems", "options": {"n": 16}},
       "plugins": {"reward_model": {"model": "stages.rn"}, "group_relative": {}}}],
     "stages[1].plugins.reward_model.model", "names no stage"),
    ([{"name": "sft", "stage": "sft", "data": SFT_DATA, "trainig": {}}], "stages[0].trainig", "did you mean"),
    ([{"name": "sft", "stage": "sft"}], "stages[0].data", "required"),
    ([{"name": "sft", "stage": "sft", "data": PAIRS}], "stages[0].data.columns.completion", "'messages'"),
    ([{"name": "a", "stage": "sft", "data": SFT_DATA}, {"name": "a", "stage": "sft", "data": SFT_DATA}],
     "stages[1].name", "two stages"),
    ([{"name": "sft", "stage": "sft", "data": SFT_DATA, "training": {"learning_rat": 1}}],
     "stages[0].training.learning_rat", "did you mean 'learning_rate'"),
])
def test_pipeline_errors_name_the_stage_before_anything_runs(cli, tmp_path, tiny_model_dir, stages, field, message):
    run = tmp_path / "run"
    code, _, err = cli("run", pipeline_recipe(tmp_path, tiny_model_dir, stages), "--output-dir", run)
    assert code == 2, err
    assert f"{field}:" in err and message in err, err
    assert not run.exists()


def test_stage_references_outside_a_pipeline_and_unknown_pipeline_keys(cli, write_recipe, tmp_path, tiny_model_dir):
    code, _, err = cli("validate", write_recipe(model={"name_or_path": "stages.sft"}))
    assert code == 2 and "model.name_or_path" in err and "no stages" in err
    code, _, err = cli("validate", pipeline_recipe(tmp_path, tiny_model_dir, sft_then_dpo(), plugins={"dpo": {}}))
    assert code == 2 and "plugins:" in err and "per stage" in err


# --- the reward_model reward source -------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir):
    """A sequence classifier with one label (a random reward model) saved with its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0}))
    return folder


def test_reward_model_scores_equal_a_direct_forward(reward_model_dir):
    from posttrain.plugins.reward_model import RewardModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plugin = RewardModel(RewardModel.parse_options({"model": str(reward_model_dir), "batch_size": 2,
                                                    "dtype": "float32"}, where="plugins.reward_model"))
    chat = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(5)]
    replies = [[{"role": "assistant", "content": "x" * (i + 1) + f" {2 * i}"}] for i in range(5)]
    plain_prompts = [f"Question: {i} + 1 =" for i in range(3)]
    plain = [" 1", " seven", " 2" * 5]
    got = plugin.posttrain_reward(prompts=chat + plain_prompts, completions=replies + plain)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    expected = []
    for p, c in zip(chat, replies):  # one at a time, no padding: the chat template of the reward model
        ids = tok.apply_chat_template(p + c, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            expected.append(model(input_ids=torch.tensor([ids])).logits.item())
    for p, c in zip(plain_prompts, plain):  # plain text: prompt + completion + EOS, as TRL's RewardTrainer
        with torch.no_grad():
            expected.append(model(**tok(p + c + tok.eos_token, return_tensors="pt")).logits.item())
    assert got == pytest.approx(expected, abs=1e-5)
    assert next(plugin.load()[0].parameters()).requires_grad is False
    normed = RewardModel(RewardModel.parse_options({"model": str(reward_model_dir), "normalize": "heldout",
                                                    "clip": 0.3, "dtype": "float32"}, where="plugins.reward_model"))
    scores = normed.posttrain_reward(prompts=chat, completions=replies)
    assert scores == pytest.approx([min(0.3, max(-0.3, (e - 0.5) / 2.0)) for e in expected[:5]], abs=1e-5)


def test_reward_model_options_are_checked(cli, online_recipe, tmp_path):
    code, _, err = cli("validate", online_recipe(plugins={"reward_model": {"model": str(tmp_path)},
                                                          "group_relative": {}}))
    assert code == 2 and "plugins.reward_model" in err and "not a model folder" in err
    code, _, err = cli("validate", online_recipe(plugins={"reward_model": {"model": "stages.rm"},
                                                          "group_relative": {}}))
    assert code == 2 and "no stages" in err


def test_instructgpt_path_reward_model_stage_feeds_online_rl(cli, tmp_path, tiny_model_dir):
    """SFT -> reward model -> online RL whose reward is the reward model of stage 2 (with a verifier)."""
    stages = [
        {"name": "sft", "stage": "sft", "data": SFT_DATA, "plugins": {}, "training": QUICK, "eval": {"generate": 0}},
        {"name": "rm", "stage": "reward_model", "data": PAIRS, "training": QUICK, "eval": {"generate": 0}},
        {"name": "rl", "stage": "online", "model": {"name_or_path": "stages.sft"},
         "data": {"source": "builtin:word_problems", "options": {"n": 32}, "eval": {"fraction": 0.25}},
         "plugins": {"reward_model": {"model": "stages.rm", "normalize": "heldout"},
                     "verify_gsm8k": {"weight": 0.1}, "group_relative": {}},
         "training": {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 8,
                      "max_steps": 2, "logging_steps": 1, "save_strategy": "no", "learning_rate": 1e-3},
         "eval": {"generate": 4, "max_new_tokens": 6}},
    ]
    run = tmp_path / "run"
    code, _, err = cli("run", pipeline_recipe(tmp_path, tiny_model_dir, stages), "--output-dir", run)
    assert code == 0, err
    assert (run / "02-rm" / "merged" / "reward_stats.json").is_file()
    rl = [r for r in read_jsonl(run / "03-rl" / "metrics.jsonl") if "loss" in r]
    assert all("rewards/reward_model/mean" in r and "rewards/verify_gsm8k/mean" in r for r in rl)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"][1]["after"]["heldout"]["pairwise_accuracy"] is not None
    assert summary["stages"][2]["after"]["answers"]["by_source"].keys() == {"reward_model", "verify_gsm8k"}
