import pytest
import torch

from posttrain.testing import assert_plugin_conforms, make_logps, run_recipe
from posttrain_hinge import Hinge


def test_conforms():
    assert_plugin_conforms(Hinge)


def test_formula_by_hand(preference_logps):
    lp = preference_logps
    out = Hinge(Hinge.Options(beta=0.5)).posttrain_preference_loss(lp)
    margin = (lp.chosen_logps - lp.ref_chosen_logps) - (lp.rejected_logps - lp.ref_rejected_logps)
    for i in range(len(margin)):
        assert out.losses[i].item() == pytest.approx(max(0.0, 1 - 0.5 * margin[i].item()))


def test_gradient_is_zero_past_the_hinge():
    lp = make_logps(requires_grad=True)
    lp.ref_chosen_logps = lp.chosen_logps.detach() - 100  # huge margin: every pair is past the hinge
    Hinge(Hinge.Options(beta=1.0)).posttrain_preference_loss(lp).losses.sum().backward()
    assert torch.all(lp.chosen_token_logps.grad == 0)


def test_trains_from_a_recipe():
    summary = run_recipe({"plugins": {"hinge": {"beta": 0.5}}}, steps=4)
    losses = [m["loss"] for m in summary["metrics"] if "loss" in m]
    assert summary["global_step"] == 4 and losses[-1] < losses[0]
