"""The sft and reward_model stages on a tiny random Llama: their losses against hand computations,
the completion-only mask, conversations, token-mask plugins, held-out numbers, and a LoRA reward
model whose score head is saved with the adapter and reloads to the same scores."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import device_batch

ARITH_SFT = {"source": "builtin:arithmetic", "options": {"n": 64}, "columns": {"completion": "chosen"},
             "eval": {"fraction": 0.25}}
ARITH_PAIRS = {"source": "builtin:arithmetic", "options": {"n": 64}, "eval": {"fraction": 0.25}}


def _plan(write_recipe, stage, **overrides):
    """float32 compute (a GPU would pick bf16): these tests check formulas to 1e-5, not bf16 numerics."""
    from posttrain.pipeline import load_recipe
    from posttrain.validate import validate

    overrides["model"] = {"dtype": "float32", **overrides.get("model", {})}
    return validate(load_recipe(write_recipe(stage=stage, **overrides)))


def _trainer(write_recipe, tmp_path, stage, **overrides):
    import importlib

    module = importlib.import_module(f"posttrain.trainers.{stage}")
    return module.build_trainer(_plan(write_recipe, stage, **overrides), tmp_path / "run")


def _hand_nll(model, batch):
    """Mean next-token NLL over the positions whose label is set (the completion tokens)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    targets = batch["input_ids"][:, 1:]
    mask = batch["labels"][:, 1:] != -100
    token = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return -(token * mask).sum() / mask.sum(), mask


@pytest.mark.parametrize("conversational", [True, False])
def test_sft_loss_is_the_nll_of_the_completion_tokens_only(write_recipe, tmp_path, conversational):
    from posttrain.trainers.parts import load_data
    from posttrain.trainers.sft import build_trainer

    data = {**ARITH_SFT, "options": {"n": 64, "conversational": conversational}}
    plan = _plan(write_recipe, "sft", data=data, plugins={}, model={"lora": None}, training={"max_length": 64})
    trainer, _ = build_trainer(plan, tmp_path / "run")
    raw = load_data(plan)[0][0]  # the first training example, as the trainer got it
    batch = device_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    hand, mask = _hand_nll(trainer.model, batch)
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    # the trained positions are exactly the completion tokens: the response's tokens (and EOS)
    tok = trainer.processing_class
    if conversational:
        prompt = tok.apply_chat_template(raw["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
        full = tok.apply_chat_template(raw["prompt"] + raw["completion"], tokenize=True, return_dict=True)
    else:
        prompt, full = tok(raw["prompt"]), tok(raw["prompt"] + raw["completion"] + tok.eos_token)
    completion_tokens = len(full["input_ids"]) - len(prompt["input_ids"])
    assert completion_tokens > 0 and int(mask[0].sum()) == completion_tokens


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sft_run_lowers_the_completion_nll(cli, write_recipe, tmp_path, lora):
    model = {"lora": {"r": 8, "alpha": 16}} if lora else {"lora": None}
    recipe = write_recipe(stage="sft", model=model, data={**ARITH_SFT, "eval": {"source": "builtin:arithmetic",
                                                                               "max_examples": 16,
                                                                               "fraction": 0.0}},
                          plugins={"verify_gsm8k": {}}, training={"max_steps": 8, "learning_rate": 3e-3})
    code, out, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    before, after = summary["before"]["heldout"], summary["after"]["heldout"]
    assert after["completion_nll"] < before["completion_nll"] - 0.05
    assert after["perplexity"] == pytest.approx(2.718281828 ** after["completion_nll"], rel=1e-6)
    assert "answer_accuracy" in summary["after"]["answers"]
    assert "held-out completion NLL" in out


def test_sft_on_conversations_trains_on_the_last_reply(write_recipe, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": f"{i} + 1 = {i + 1}"}]} for i in range(40)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer, heldout = _trainer(write_recipe, tmp_path, "sft", data={"source": str(path), "options": {}, "eval": {"fraction": 0.25}},
                                plugins={})
    assert {"prompt", "completion"} <= set(heldout.column_names)  # split into prompt and last reply
    batch = device_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    assert loss.item() == pytest.approx(_hand_nll(trainer.model, batch)[0].item(), rel=1e-5)


def test_sft_token_mask_plugins_remove_tokens_from_the_loss(write_recipe, tmp_path):
    trainer, _ = _trainer(write_recipe, tmp_path, "sft", data=ARITH_SFT, plugins={"online_plugins:NoDigits": {}})
    batch = device_batch(trainer)
    digits = {i for tok, i in trainer.processing_class.get_vocab().items() if any(ch.isdigit() for ch in tok)}
    trained = batch["labels"][batch["labels"] != -100].tolist()
    assert trained and not set(trained) & digits  # every digit token left the loss
    plain, _ = _trainer(write_recipe, tmp_path / "plain", "sft", data=ARITH_SFT, plugins={})
    assert set(device_batch(plain)["labels"][device_batch(plain)["labels"] != -100].tolist()) & digits


def test_sft_refuses_preference_only_options(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(stage="sft", data=ARITH_SFT, plugins={"dpo": {}}))
    assert code == 2 and "plugins.dpo" in err and "sft stage" in err
    code, _, err = cli("validate", write_recipe(stage="sft", data=ARITH_SFT, plugins={"mask_format_tokens": {}}))
    assert code == 2 and "plugins.mask_format_tokens" in err and "applies to the preference stage, not to sft" in err
    code, _, err = cli("validate", write_recipe(stage="sft", data=ARITH_PAIRS, plugins={}))
    assert code == 2 and "data.columns.completion" in err and "'messages'" in err


# --- reward model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [False, True])
def test_reward_model_loss_is_the_bradley_terry_loss(write_recipe, tmp_path, margin):
    data = ARITH_PAIRS
    if margin:
        from posttrain.builtin import ArithmeticOptions, arithmetic

        rows = arithmetic(ArithmeticOptions(n=48))
        for i, r in enumerate(rows):
            r["margin"] = 0.25 * (i % 4)
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data = {"source": str(path), "options": {}, "eval": {"fraction": 0.25}}
    trainer, _ = _trainer(write_recipe, tmp_path, "reward_model", data=data, plugins={},
                          training={"center_rewards_coefficient": 0.01})
    batch = device_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        scores = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    chosen, rejected = scores.chunk(2)
    m = batch["margin"] if margin else 0.0
    hand = -F.logsigmoid(chosen - rejected - m).mean() + 0.01 * ((chosen + rejected) ** 2).mean()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    assert ("margin" in batch) == margin


def test_lora_reward_model_head_is_saved_with_the_adapter_and_reloads(write_recipe, tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    trainer, _ = _trainer(write_recipe, tmp_path, "reward_model", data=ARITH_PAIRS, plugins={},
                          training={"max_steps": 4, "learning_rate": 1e-2, "save_strategy": "no"})
    head_before = trainer.model.base_model.model.score.modules_to_save["default"].weight.detach().clone()
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    batch = device_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    head_after = trainer.model.base_model.model.score.modules_to_save["default"].weight
    assert not torch.allclose(head_before, head_after)  # the head was trained
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "saved", num_labels=1,
                                                                      dtype=torch.float32).eval()
    reloaded.config.pad_token_id = trainer.processing_class.pad_token_id
    with torch.no_grad():
        again = reloaded.to(batch["input_ids"].device)(input_ids=batch["input_ids"],
                                                         attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(trained.float(), again.float(), atol=1e-5)


@pytest.mark.slow
def test_reward_model_run_reports_pairwise_accuracy_and_stats(cli, write_recipe, tmp_path):
    recipe = write_recipe(stage="reward_model", data=ARITH_PAIRS, plugins={},
                          training={"max_steps": 6, "learning_rate": 5e-3})
    code, out, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for when in ("before", "after"):
        assert 0 <= summary[when]["heldout"]["pairwise_accuracy"] <= 1
    stats = json.loads((tmp_path / "run" / "final" / "reward_stats.json").read_text())
    assert stats == summary["reward_stats"] and stats["n"] == 2 * summary["heldout_examples"] and stats["std"] > 0
    assert "held-out pairwise accuracy" in out
