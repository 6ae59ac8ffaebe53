"""TRL's policy-loss options in the online stage, by hand: on identical rollouts whose importance ratios differ
from 1 (the updates after the first on a generation batch), the loss OnlineTrainer computes is the clipped
surrogate written out from the per-token log-probs, for each loss_type (grpo, bnpo, dr_grpo, dapo) and each
importance-sampling level (token, or GSPO's sequence), and each choice changes the loss and its gradient."""

import pytest
import torch
import yaml


def _log_softmax_picked(model, ids, mask, keep):
    """Per-token log-probs of the last `keep` tokens, computed from the model's logits directly."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -keep - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, -keep:].unsqueeze(-1)).squeeze(-1)


def _by_hand(logps, old, advantages, mask, loss_type, level, eps_low, eps_high, max_len, items):
    """The clipped surrogate of GRPO/DAPO/Dr. GRPO/GSPO from per-token log-probs (independent of TRL's code)."""
    rows = []
    for i in range(logps.shape[0]):
        tokens = [t for t in range(logps.shape[1]) if mask[i, t] > 0]
        log_ratios = [logps[i, t] - old[i, t] for t in tokens]
        if level == "sequence":  # GSPO: one ratio per sequence, the geometric mean of the token ratios
            seq = torch.exp(sum(log_ratios) / max(1, len(tokens)))
            ratios = [seq] * len(tokens)
        else:
            ratios = [torch.exp(r) for r in log_ratios]
        a = advantages[i]
        rows.append([-torch.minimum(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a) for r in ratios])
    total = sum(sum(r) for r in rows)
    count = sum(len(r) for r in rows)
    if loss_type == "grpo":  # each sequence's mean, then the mean over sequences
        return sum(sum(r) / max(1, len(r)) for r in rows) / len(rows)
    if loss_type == "bnpo":  # the mean over the batch's tokens
        return total / count
    if loss_type == "dr_grpo":  # a constant: rows x max_completion_length
        return total / (len(rows) * max_len)
    return total / items  # dapo: the tokens of the whole generation batch (num_items_in_batch)


@pytest.fixture(scope="module")
def trainer_and_batch(tmp_path_factory, tiny_model_dir):
    from posttrain.pipeline import load_recipe
    from posttrain.trainers.online import build_trainer
    from posttrain.validate import validate

    folder = tmp_path_factory.mktemp("policy_loss")
    recipe = folder / "online.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "online", "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"source": "builtin:word_problems", "options": {"n": 16}},
        "plugins": {"online_plugins:DigitShare": {}, "group_relative": {}},
        "training": {"per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 6,
                     "epsilon": 0.2, "epsilon_high": 0.28}}))
    trainer, _ = build_trainer(validate(load_recipe(recipe)), folder / "run")
    generator = torch.Generator().manual_seed(0)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (4, 5), generator=generator)
    completion_ids = torch.randint(3, vocab, (4, 6), generator=generator)
    completion_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]])
    model = trainer.model
    model.train()
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    with torch.no_grad():
        current = _log_softmax_picked(model, ids, mask, 6)
    # the policy at sampling time: shifted per token, so that some ratios leave [1 - 0.2, 1 + 0.28] and others not
    shift = torch.tensor([[0.5, -0.1, 0.05, 0.3, -0.4, 0.0], [-0.2, 0.25, 0.1, -0.05, 0.0, 0.0],
                          [0.02, -0.6, 0.0, 0.0, 0.0, 0.0], [0.1, 0.1, -0.35, 0.2, 0.15, 0.0]])
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.tensor([1.0, -0.5, 2.0, -1.5]),
              "old_per_token_logps": (current - shift) * completion_mask,
              "num_items_in_batch": torch.tensor(30)}  # the generation batch: this micro-batch (17 tokens) and another
    return trainer, inputs, ids, mask


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_the_loss_is_the_clipped_surrogate_by_hand(trainer_and_batch, loss_type, level, monkeypatch):
    trainer, inputs, ids, mask = trainer_and_batch
    monkeypatch.setattr(trainer, "loss_type", loss_type)
    monkeypatch.setattr(trainer, "importance_sampling_level", level)
    monkeypatch.setattr(trainer.args, "steps_per_generation", 2)
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 1, raising=False)
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, inputs)
        logps = _log_softmax_picked(trainer.model, ids, mask, 6)
    expected = _by_hand(logps, inputs["old_per_token_logps"], inputs["advantages"], inputs["completion_mask"],
                        loss_type, level, 0.2, 0.28, 6, float(inputs["num_items_in_batch"]) / 2)
    assert loss.item() == pytest.approx(float(expected), abs=1e-5)


def test_each_choice_changes_the_update(trainer_and_batch, monkeypatch):
    """Sequence- and token-level ratios, and the four normalisations, give different gradients on the same
    rollouts once the ratios are not 1 (at ratio 1, sequence and token level coincide)."""
    trainer, inputs, _, _ = trainer_and_batch
    monkeypatch.setattr(trainer.args, "steps_per_generation", 2)
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 1, raising=False)
    grads = {}
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for level in ("token", "sequence"):
            monkeypatch.setattr(trainer, "loss_type", loss_type)
            monkeypatch.setattr(trainer, "importance_sampling_level", level)
            trainer.model.zero_grad()
            trainer._compute_loss(trainer.model, inputs).backward()
            grads[loss_type, level] = torch.cat([p.grad.flatten() for p in trainer.model.parameters()
                                                 if p.grad is not None]).clone()
    trainer.model.zero_grad()
    keys = list(grads)
    for i, a in enumerate(keys):
        assert grads[a].abs().sum() > 0
        for b in keys[i + 1:]:
            assert not torch.allclose(grads[a], grads[b], rtol=1e-4, atol=1e-8), (a, b)
    # at ratio 1 (the first update on a batch) the two levels give the same gradient
    on_policy = dict(inputs)
    on_policy.pop("old_per_token_logps")
    same = []
    for level in ("token", "sequence"):
        monkeypatch.setattr(trainer, "loss_type", "grpo")
        monkeypatch.setattr(trainer, "importance_sampling_level", level)
        trainer.model.zero_grad()
        trainer._compute_loss(trainer.model, on_policy).backward()
        same.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]).clone())
    trainer.model.zero_grad()
    assert torch.allclose(same[0], same[1], rtol=1e-4, atol=1e-7)
