"""REINFORCE++ and REINFORCE++-baseline (`reinforce_pp`): per-token advantages against a hand computation
(the KL in the return, the group mean in the baseline form, unscored rows, normalisation over the whole
batch), the refusal of the baseline with one completion per prompt, and a run in which the per-token
advantages reach TRL's loss without a critic."""

import math

import pytest
import yaml
import torch
from conftest import read_jsonl

from posttrain.plugins.reinforce_pp import ReinforcePP
from posttrain.testing import make_rollouts


def _kl(lp, ref, estimator):
    log_r = ref - lp
    return {"k1": -log_r, "k2": 0.5 * log_r ** 2, "k3": math.exp(log_r) - 1 - log_r}[estimator]


def _hand(rewards, mask, logps, ref, beta, group, baseline, estimator="k1"):
    """Straight from the definitions, with Python lists: R' (baseline: minus the scorable group mean), r_t,
    G_t = Σ_{s≥t} r_s, then (G − mean) / (std + 1e-4) over the tokens of the scored rows."""
    n = len(rewards)
    if baseline:
        shifted = []
        for i, r in enumerate(rewards):
            g = [x for x in rewards[(i // group) * group:(i // group + 1) * group] if x is not None]
            shifted.append(None if r is None else r - sum(g) / len(g))
        rewards = shifted
    rows = []
    for i in range(n):
        length = int(sum(mask[i]))
        r = [-beta * _kl(logps[i][t], ref[i][t], estimator) for t in range(length)]
        if length:
            r[-1] += 0.0 if rewards[i] is None else rewards[i]
        rows.append([sum(r[t:]) for t in range(length)])
    pooled = [g for i, row in enumerate(rows) if rewards[i] is not None for g in row]
    mean = sum(pooled) / len(pooled)
    std = math.sqrt(sum((g - mean) ** 2 for g in pooled) / (len(pooled) - 1))
    return [None if rewards[i] is None else [(g - mean) / (std + 1e-4) for g in row] for i, row in enumerate(rows)]


@pytest.mark.parametrize("baseline", [False, True])
@pytest.mark.parametrize("kl, estimator", [("reward", "k1"), ("reward", "k2"), ("reward", "k3"), ("loss", "k3")])
def test_advantages_by_hand(baseline, kl, estimator):
    rewards = [1.0, 0.0, None, 2.0, 0.5, 0.5, 3.0, -1.0]
    rollouts = make_rollouts(rewards, group_size=4, completion_length=5, seed=3)
    torch.manual_seed(0)
    rollouts.logps, rollouts.ref_logps = -torch.rand(8, 5), -torch.rand(8, 5)
    rollouts.kl_coef = 0.1
    mask = rollouts.completion_mask
    rollouts.logps, rollouts.ref_logps = rollouts.logps * mask, rollouts.ref_logps * mask
    options = ReinforcePP.Options(baseline=baseline, kl=kl, kl_estimator=estimator)
    out = ReinforcePP(options).posttrain_advantage_estimate(rollouts)
    assert out.kl_in_reward == (kl == "reward")
    hand = _hand(rewards, mask.tolist(), rollouts.logps.tolist(), rollouts.ref_logps.tolist(),
                 0.1 if kl == "reward" else 0.0, 4, baseline, estimator)
    for i, row in enumerate(hand):
        length = int(mask[i].sum())
        if row is None:
            assert torch.isnan(out.advantages[i]).all()  # unscored: 0 once the trainer takes NaN to 0
            continue
        assert out.advantages[i, :length].tolist() == pytest.approx(row, abs=1e-5)
        assert (out.advantages[i, length:] == 0).all()
    scored = out.advantages[~torch.isnan(out.advantages[:, 0])][mask[~torch.isnan(out.advantages[:, 0])].bool()]
    assert scored.mean().item() == pytest.approx(0.0, abs=1e-5)  # whitened over the batch's tokens


def test_the_kl_estimators_by_hand():
    from posttrain.plugins.gae import kl_terms, per_token_rewards

    lp = torch.tensor([[-1.0, -0.2, -3.0]])
    ref = torch.tensor([[-0.5, -0.9, -3.0]])
    for estimator in ("k1", "k2", "k3"):
        hand = [_kl(a, b, estimator) for a, b in zip(lp[0].tolist(), ref[0].tolist())]
        assert kl_terms(lp, ref, estimator)[0].tolist() == pytest.approx(hand, abs=1e-6)
    assert (kl_terms(lp, ref, "k3") >= 0).all() and (kl_terms(lp, ref, "k2") >= 0).all()
    assert kl_terms(lp, ref, "k1")[0, 0] < 0  # k1 can be negative on a token
    # GAE's per-token rewards: -β·KL_t on every token, the sequence's reward on the last
    out = per_token_rewards(torch.tensor([2.0]), torch.ones(1, 3), lp, ref, 0.5, "k3")
    hand = [-0.5 * _kl(a, b, "k3") for a, b in zip(lp[0].tolist(), ref[0].tolist())]
    hand[-1] += 2.0
    assert out[0].tolist() == pytest.approx(hand, abs=1e-6)


def test_an_unknown_kl_estimator_is_refused_at_validate(cli, online_recipe):
    recipe = online_recipe(plugins={"verify_gsm8k": {}, "reinforce_pp": {"kl_estimator": "k4"}})
    code, _, err = cli("validate", recipe)
    assert code == 2 and "plugins.reinforce_pp.kl_estimator" in err and "k3" in err, err


@pytest.mark.parametrize("plugins, beta, words", [
    ({"reinforce_pp": {"kl_estimator": "k3"}}, None, "training.beta is 0"),
    ({"reinforce_pp": {"kl_estimator": "k2", "kl": "loss"}}, 0.05, "kl: loss"),
    ({"critic": {}, "gae": {"kl_estimator": "k3"}}, 0.0, "training.beta is 0"),
])
def test_a_kl_estimator_that_cannot_act_is_refused_at_validate(cli, online_recipe, plugins, beta, words):
    recipe = online_recipe(plugins={"verify_gsm8k": {}, **plugins},
                           **({} if beta is None else {"training": {"beta": beta}}))  # None: TRL's default, 0
    code, _, err = cli("validate", recipe)
    name = next(iter(k for k in plugins if k != "critic"))
    assert code == 2 and f"plugins.{name}.kl_estimator" in err and words in err, err
    working = online_recipe(name="working", plugins={"verify_gsm8k": {}, **plugins},
                            training={"beta": 0.05})
    data = yaml.safe_load(working.read_text())
    data["plugins"][name].pop("kl", None)
    working.write_text(yaml.safe_dump(data))
    assert cli("validate", working)[0] == 0


def test_the_baseline_with_one_completion_per_prompt_is_refused(cli, online_recipe):
    recipe = online_recipe(plugins={"verify_gsm8k": {}, "reinforce_pp": {"baseline": True}},
                           training={"num_generations": 1, "per_device_train_batch_size": 4})
    code, _, err = cli("validate", recipe)
    assert code == 2 and "plugins.reinforce_pp.baseline" in err and "num_generations" in err, err


@pytest.mark.slow
def test_a_run_trains_on_per_token_advantages_with_the_kl_in_the_reward(cli, online_recipe, tmp_path):
    recipe = online_recipe(plugins={"online_plugins:DigitShare": {}, "reinforce_pp": {"baseline": True}},
                           training={"beta": 0.05, "max_steps": 2}, eval={"generate": 0})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    logged = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward" in m]
    assert len(logged) == 2
    for m in logged:
        assert "kl_in_reward" in m and math.isfinite(m["kl_in_reward"])  # the KL went into the return
        assert math.isfinite(m["loss"])
