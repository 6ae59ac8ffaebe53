"""ORPO and CPO as reference-free loss plugins: parity with TRL's experimental ORPOTrainer.odds_ratio_loss
and CPOTrainer.cpo_loss on the same log-probs, the NLL term by hand, and short runs that load and run no
reference model."""

import math
from types import SimpleNamespace

import pytest

from posttrain.plugins.cpo import CPO
from posttrain.plugins.orpo import ORPO
from posttrain.testing import make_logps


def _total(plugin, logps):
    loss = plugin.posttrain_preference_loss(logps)
    terms = plugin.posttrain_loss_terms(logps) or {}
    return loss.losses.mean() + sum(terms.values()), loss, terms


def test_orpo_equals_trl_odds_ratio_loss():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logps = make_logps(batch=6, length=7, seed=3, reference=False)
    beta = 0.25
    total, out, terms = _total(ORPO(ORPO.Options(beta=beta)), logps)
    chosen = logps.chosen_logps / logps.chosen_lengths  # TRL's ORPO averages the log-probs over the tokens
    rejected = logps.rejected_logps / logps.rejected_lengths
    trl_self = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    trl_losses, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(trl_self, chosen, rejected)
    # TRL returns β·log σ(log odds ratio) and subtracts its mean from the NLL
    assert out.losses.tolist() == pytest.approx((-trl_losses).tolist(), abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx(trl_chosen.tolist(), abs=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx(trl_rejected.tolist(), abs=1e-6)
    # the NLL term: the chosen tokens' mean negative log-likelihood over the batch, by hand
    tokens = [-logps.chosen_token_logps[i, t].item() for i in range(6) for t in range(7) if logps.chosen_mask[i, t]]
    assert terms["orpo_nll"].item() == pytest.approx(sum(tokens) / len(tokens), rel=1e-12)
    # and the odds ratio by hand for one pair
    c, r = chosen[0].item(), rejected[0].item()
    odds = (c - math.log(1 - math.exp(c))) - (r - math.log(1 - math.exp(r)))
    assert out.losses[0].item() == pytest.approx(-beta * math.log(1 / (1 + math.exp(-odds))), rel=1e-6)  # float32, as TRL


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cpo_equals_trl_cpo_loss(smoothing):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    logps = make_logps(batch=5, length=6, seed=4, reference=False)
    beta, alpha = 0.2, 0.5
    total, out, terms = _total(CPO(CPO.Options(beta=beta, alpha=alpha, label_smoothing=smoothing)), logps)
    trl_self = SimpleNamespace(beta=beta, alpha=0.0, loss_type="sigmoid", label_smoothing=smoothing, simpo_gamma=0.5,
                               accelerator=SimpleNamespace(device="cpu"))
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(trl_self, logps.chosen_logps, logps.rejected_logps)
    assert out.losses.tolist() == pytest.approx(trl_losses.tolist(), abs=1e-9)
    assert out.chosen_rewards.tolist() == pytest.approx(trl_chosen.tolist(), abs=1e-9)
    tokens = -logps.chosen_token_logps.sum() / logps.chosen_mask.sum()
    assert terms["cpo_nll"].item() == pytest.approx(alpha * tokens.item(), rel=1e-12)
    assert CPO(CPO.Options(alpha=0.0)).posttrain_loss_terms(logps) is None


@pytest.mark.parametrize("plugin", ["orpo", "cpo"])
def test_orpo_and_cpo_train_without_a_reference(plugin, write_recipe, tmp_path):
    from posttrain.pipeline import load_recipe
    from posttrain.trainers.preference import build_trainer
    from posttrain.validate import validate

    plan = validate(load_recipe(write_recipe(model={"lora": None}, plugins={plugin: {}}, training={"max_steps": 2})))
    trainer, _ = build_trainer(plan, tmp_path)
    assert trainer.uses_reference is False and trainer.ref_model is None  # full fine-tuning, and no reference copy
    trainer.compute_ref_log_probs = lambda *a, **k: pytest.fail("a reference pass ran")
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(math.isfinite(h["loss"]) for h in logged)
    assert any(f"loss/{plugin}_nll" in h for h in trainer.state.log_history)
