"""ref_ema in the preference and online stages: η = 0 leaves the reference unchanged, η = 1 makes it
equal to the policy, and in between it moves towards the policy, for full fine-tuning (a separate
model) and for LoRA (a 'ref' adapter that the reference passes of TRL's DPOTrainer and
GRPOTrainer use)."""

import pytest
from conftest import device_batch
import torch

from posttrain.trainers.online import build_trainer as online_build
from posttrain.trainers.preference import build_trainer
from posttrain.pipeline import load_recipe
from posttrain.validate import validate


def _train(write_recipe, online_recipe, tmp_path, lora, eta, stage="preference", steps=3):
    model = {"lora": {"r": 8, "alpha": 16}} if lora else {"lora": None}
    if stage == "online":
        recipe = online_recipe(model=model, plugins={"online_plugins:DigitShare": {}, "group_relative": {},
                                                     "ref_ema": {"eta": eta}},
                               training={"max_steps": steps, "learning_rate": 2e-2, "beta": 0.1}, eval={"generate": 0})
    else:
        recipe = write_recipe(model=model, plugins={"dpo": {"beta": 0.5}, "ref_ema": {"eta": eta}},
                              training={"max_steps": steps, "learning_rate": 2e-2}, eval={"generate": 0})
    plan = validate(load_recipe(recipe))
    trainer, _ = (online_build if stage == "online" else build_trainer)(plan, tmp_path)
    if lora:
        initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".default." in n}
    else:
        initial = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    return trainer, initial


def _pairs(trainer, lora):
    """(policy, reference) tensors, matched by name."""
    if lora:
        params = dict(trainer.model.named_parameters())
        return {n: (p.detach(), params[n.replace(".default.", ".ref.")].detach())
                for n, p in params.items() if ".default." in n}
    ref = dict(trainer.ref_model.named_parameters())
    return {n: (p.detach(), ref[n].detach()) for n, p in trainer.model.named_parameters()}


def _distance(pairs, which):
    return sum(float((a - b).pow(2).sum()) for a, b in (which(p, r) for p, r in pairs.values())) ** 0.5


STAGES = pytest.mark.parametrize("stage", ["preference", "online"])
KINDS = pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])


@pytest.mark.slow
@STAGES
@KINDS
def test_eta_zero_keeps_the_reference(write_recipe, online_recipe, tmp_path, lora, stage):
    trainer, initial = _train(write_recipe, online_recipe, tmp_path, lora, eta=0.0, stage=stage)
    pairs = _pairs(trainer, lora)
    assert all(torch.equal(r, initial[n]) for n, (_, r) in pairs.items())
    assert any(not torch.equal(p, initial[n]) for n, (p, _) in pairs.items())  # the policy did move


@pytest.mark.slow
@STAGES
@KINDS
def test_eta_one_copies_the_policy(write_recipe, online_recipe, tmp_path, lora, stage):
    trainer, initial = _train(write_recipe, online_recipe, tmp_path, lora, eta=1.0, stage=stage)
    pairs = _pairs(trainer, lora)
    assert all(torch.allclose(p, r) for p, r in pairs.values())
    assert any(not torch.equal(r, initial[n]) for n, (_, r) in pairs.items())


@pytest.mark.slow
@STAGES
@KINDS
def test_eta_between_moves_towards_the_policy(write_recipe, online_recipe, tmp_path, lora, stage):
    trainer, initial = _train(write_recipe, online_recipe, tmp_path, lora, eta=0.5, stage=stage)
    pairs = _pairs(trainer, lora)
    moved = _distance({n: (initial[n], r) for n, (_, r) in pairs.items()}, lambda a, b: (a, b))
    to_policy = _distance(pairs, lambda p, r: (p, r))
    initial_to_policy = _distance({n: (p, initial[n]) for n, (p, _) in pairs.items()}, lambda a, b: (a, b))
    assert moved > 0 and to_policy < initial_to_policy


def test_lora_reference_pass_uses_the_ema_adapter(write_recipe, online_recipe, tmp_path):
    trainer, _ = _train(write_recipe, online_recipe, tmp_path, lora=True, eta=1.0)
    batch = device_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                            fused_lm_head=True)
        policy = (out.log_probs * batch["completion_mask"][:, 1:]).sum(1)
        with trainer.model.disable_adapter():
            base = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 labels=labels, fused_lm_head=True)
        base = (base.log_probs * batch["completion_mask"][:, 1:]).sum(1)
    ref = torch.cat([ref_chosen, ref_rejected])
    assert torch.allclose(ref, policy, atol=1e-5)  # η = 1: the reference is the policy
    assert not torch.allclose(ref, base, atol=1e-3)  # and not the adapter-disabled base any more


def test_online_lora_reference_pass_uses_the_ema_adapter(write_recipe, online_recipe, tmp_path):
    """GRPO's reference log-probs come from the 'ref' adapter: with η = 1 they are the policy's
    (the KL term is then 0), and not the adapter-disabled base model's."""
    trainer, _ = _train(write_recipe, online_recipe, tmp_path, lora=True, eta=1.0, stage="online")
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kls and kls[0] == pytest.approx(0, abs=1e-6)
    trainer.model.eval()
    output = trainer._generate_and_score_completions(
        [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "ground_truth": "5"}] * 4)
    with torch.no_grad():
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        keep = output["completion_ids"].size(1)
        policy, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
        with trainer.model.disable_adapter():
            base, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
    cm = output["completion_mask"].bool()
    assert torch.allclose(output["ref_per_token_logps"][cm], policy[cm], atol=1e-5)
    assert not torch.allclose(output["ref_per_token_logps"][cm], base[cm], atol=1e-3)
