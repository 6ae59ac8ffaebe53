"""stage: kto on TRL's KTOTrainer: the loss against KTO's formula computed by hand from log-probs (LoRA
and full fine-tuning), short runs of both, pairs split into unpaired examples, and the recipe errors."""

import pytest
import torch
import yaml
from conftest import device_batch


def _kto_recipe(tmp_path, tiny_model_dir, lora=True, **training):
    data = {
        "stage": "kto",
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32",
                  "lora": {"r": 8, "alpha": 16, "dropout": 0.0} if lora else None},
        "data": {"source": "builtin:arithmetic", "options": {"n": 48}, "eval": {"fraction": 0.25}},
        "plugins": {"verify_gsm8k": {"alpha": 1.0}},
        "training": {"learning_rate": 5e-3, "per_device_train_batch_size": 6, "per_device_eval_batch_size": 6,
                     "max_steps": 2, "logging_steps": 1, "save_strategy": "no", "max_length": 64,
                     "disable_dropout": True, **training},
        "eval": {"generate": 4, "max_new_tokens": 6},
    }
    path = tmp_path / f"kto-{'lora' if lora else 'full'}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _sequence_logps(model, input_ids, attention_mask, completion_mask):
    """Sum of log π(token) over each sequence's completion tokens, from the model's own logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    token_logps = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_the_kto_loss_is_the_formula_by_hand(lora, tmp_path, tiny_model_dir):
    from posttrain.pipeline import load_recipe
    from posttrain.trainers.kto import build_trainer
    from posttrain.validate import validate

    beta, w_d, w_u = 0.3, 1.5, 0.7
    recipe = _kto_recipe(tmp_path, tiny_model_dir, lora=lora, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    trainer, _ = build_trainer(validate(load_recipe(recipe)), tmp_path / "run")
    data = trainer.train_dataset
    # each example's KL completion is its neighbour's completion, within a batch (TRL's mismatched pairs)
    assert data[1]["KL_completion_ids"] == data[0]["completion_ids"]
    labels = [bool(x) for x in data["label"][:6]]
    assert any(labels) and not all(labels)
    batch = device_batch(trainer, 6)
    model = trainer.model
    model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()
        policy = _sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        policy_kl = _sequence_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"],
                                    batch["KL_completion_mask"])
        if lora:
            with model.disable_adapter():
                ref = _sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
                ref_kl = _sequence_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"],
                                         batch["KL_completion_mask"])
        else:
            ref_model = trainer.ref_model
            assert ref_model is not None and ref_model is not model
            ref = _sequence_logps(ref_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            ref_kl = _sequence_logps(ref_model, batch["KL_input_ids"], batch["KL_attention_mask"],
                                     batch["KL_completion_mask"])
    z0 = max(0.0, (policy_kl - ref_kl).mean().item())
    by_hand = []
    for i, desirable in enumerate(batch["label"].tolist()):
        r = (policy[i] - ref[i]).item()
        if desirable:
            by_hand.append(w_d * (1 - torch.sigmoid(torch.tensor(beta * (r - z0))).item()))
        else:
            by_hand.append(w_u * (1 - torch.sigmoid(torch.tensor(beta * (z0 - r))).item()))
    assert loss == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_kto_run_trains_and_reports(cli, tmp_path, tiny_model_dir, lora):
    import json

    run = tmp_path / "run"
    code, out, err = cli("run", _kto_recipe(tmp_path, tiny_model_dir, lora=lora), "--output-dir", run)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stage"] == "kto" and summary["global_step"] == 2
    assert {"loss", "reward_margin", "kl"} <= set(summary["after"]["heldout"])
    assert summary["after"]["answers"]["n"] == 4  # held-out prompts once each (the pairs were split in two)
    assert (run / "final" / ("adapter_config.json" if lora else "config.json")).is_file()
    assert "held-out KTO reward margin" in out


def test_kto_recipe_errors(cli, tmp_path, tiny_model_dir):
    recipe = _kto_recipe(tmp_path, tiny_model_dir, train_sampling_strategy="random")
    code, _, err = cli("validate", recipe)
    assert code == 2 and "training.train_sampling_strategy" in err
    code, _, err = cli("validate", _kto_recipe(tmp_path, tiny_model_dir), "--set", "data.source=builtin:word_problems")
    assert code == 2 and "the kto stage needs a 'completion' column" in err and "'prompt', 'chosen', 'rejected'" in err
    code, _, err = cli("validate", _kto_recipe(tmp_path, tiny_model_dir), "--set", f"model.reference={tiny_model_dir}")
    assert code == 2 and "model.reference" in err
    code, _, err = cli("validate", _kto_recipe(tmp_path, tiny_model_dir), "--set", "plugins.dpo={}")
    assert code == 2 and "plugin 'dpo' does nothing in the kto stage" in err
