"""TPO in the core preference stage: formulas by hand, parity with TRL's experimental TPOTrainer,
the gold column's validation, and training."""

import json
import math

import pytest
import torch

from posttrain.plugins.tpo import TPO
from posttrain.plugin_set import PluginSet
from posttrain.types import PreferenceLogps

CHOSEN, REJECTED = [-12.0, -3.5], [-15.0, -2.0]
LEN_CHOSEN, LEN_REJECTED = [4, 2], [5, 3]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _logps():
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    gold_tok = t([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]])
    gold_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return PreferenceLogps(t(CHOSEN), t(REJECTED), None, None, t(LEN_CHOSEN), t(LEN_REJECTED), None, None, None,
                           None, gold_logps=gold_tok.sum(1), gold_lengths=gold_mask.sum(1),
                           gold_token_logps=gold_tok, gold_mask=gold_mask)


@pytest.mark.parametrize("variant", ["sigmoid", "hinge", "ipo", "tpo-l"])
def test_tpo_by_hand(variant):
    beta, eps, gamma, alpha = 0.3, 0.1 if variant in ("sigmoid", "tpo-l") else 0.0, 0.5, 0.8
    plugin = TPO(TPO.Options(beta=beta, variant=variant, alpha=alpha, gamma=gamma, label_smoothing=eps))
    lp = _logps()
    losses = plugin.posttrain_preference_loss(lp).losses.tolist()
    for i in range(2):
        c, r = CHOSEN[i], REJECTED[i]
        if variant in ("ipo", "tpo-l"):
            c, r = c / LEN_CHOSEN[i], r / LEN_REJECTED[i]
        d = c - r
        if variant == "hinge":
            expected = max(0.0, 1 - beta * d)
        elif variant == "ipo":
            expected = (d - 1 / (2 * beta)) ** 2
        else:
            if variant == "tpo-l":
                d -= gamma / beta
            expected = -(1 - eps) * math.log(sigmoid(beta * d)) - eps * math.log(sigmoid(-beta * d))
        assert losses[i] == pytest.approx(expected, abs=1e-12)
    nll = plugin.posttrain_loss_terms(lp)["tpo_nll"].item()
    assert nll == pytest.approx(alpha * (1 + 2 + 0.5 + 0.5 + 1) / 5)


@pytest.mark.parametrize("variant", ["sigmoid", "hinge", "ipo", "tpo-l"])
def test_parity_with_trl_tpo_trainer(tiny_model_dir, tmp_path, variant):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig
    from trl.experimental.tpo import TPOConfig, TPOTrainer

    from posttrain.builtin import ArithmeticOptions, arithmetic
    from posttrain.trainers.preference import PreferenceTrainer

    records = arithmetic(ArithmeticOptions(n=6, seed=9))
    for i, r in enumerate(records):  # a gold response that differs from the chosen one
        r["reference"] = [{"role": "assistant", "content": f"The answer is {r['ground_truth']}." + " ok" * (i % 3)}]
    data = Dataset.from_list(records)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    common = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", seed=0,
                  per_device_train_batch_size=6)
    beta, alpha, eps = 0.2, 0.6, (0.1 if variant in ("sigmoid", "tpo-l") else 0.0)
    torch.manual_seed(0)
    theirs = TPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), processing_class=tok,
                        args=TPOConfig(output_dir=str(tmp_path / "trl"), loss_type=variant, beta=beta,
                                       tpo_alpha=alpha, tpo_l_gamma=0.4, label_smoothing=eps, **common),
                        train_dataset=data)
    plugin = TPO(TPO.Options(beta=beta, variant=variant, alpha=alpha, gamma=0.4, label_smoothing=eps))
    ours = PreferenceTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), processing_class=tok,
                             args=DPOConfig(output_dir=str(tmp_path / "ours"), **common), train_dataset=data,
                             plugins=PluginSet([plugin]))
    assert ours.ref_model is None and ours.uses_gold
    batch = theirs.data_collator([theirs.train_dataset[i] for i in range(6)])
    ours_batch = ours.data_collator([ours.train_dataset[i] for i in range(6)])
    assert torch.equal(batch["input_ids"], ours_batch["input_ids"])  # the same tokenisation, gold included
    theirs.model.eval(), ours.model.eval()
    with torch.no_grad():
        a = ours.compute_loss(ours.model, dict(batch)).item()
        b = theirs.compute_loss(theirs.model, dict(batch)).item()
    assert abs(a - b) < 1e-5, (a, b)


def test_missing_reference_column_is_refused_before_loading(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"tpo": {}}))
    assert code == 2
    assert "plugin 'tpo' needs a 'reference' column" in err and "data.columns.reference" in err


def test_tpo_without_nll_needs_no_reference_column(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"tpo": {"alpha": 0.0}}))
    assert code == 0, err


@pytest.mark.slow
@pytest.mark.parametrize("plugins", [
    {"tpo": {"beta": 0.5}},
    {"tpo": {"beta": 0.5, "variant": "tpo-l"}, "rpo": {"alpha": 0.2}, "mask_format_tokens": {}},
], ids=["tpo", "tpo-l+rpo+mask"])
def test_tpo_trains(cli, write_recipe, tmp_path, plugins):
    on_train = {"options": {"n": 96, "reference": True},
                "eval": {"source": "builtin:arithmetic", "max_examples": 16, "fraction": 0.0}}
    recipe = write_recipe(data=on_train, plugins=plugins, eval={"generate": 0})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 2 and "needs a 'reference' column" in err  # the held-out source lacks it...
    recipe = write_recipe(data={**on_train, "eval": {"fraction": 0.0}}, plugins=plugins, eval={"generate": 0})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    nll = [r["loss/tpo_nll"] for r in lines if "loss/tpo_nll" in r]
    assert losses[-1] < losses[0] and nll[-1] < nll[0]
