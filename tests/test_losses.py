"""The preference-loss family: each formula against a hand computation from log-probs, parity with
TRL's built-in loss where one exists, a few real training steps with the loss going down, and the
plugins composed in one recipe."""

import json
import math

import pytest
from conftest import device_batch
import torch

from posttrain.plugins.dpo import DPO
from posttrain.plugins.dpo_norm import DPONorm
from posttrain.plugins.ipo import IPO
from posttrain.plugins.mask_format_tokens import MaskFormatTokens
from posttrain.plugins.robust_dpo import RobustDPO
from posttrain.plugins.rpo import RPO
from posttrain.plugins.simpo import SimPO
from posttrain.plugin_set import PluginSet
from posttrain.types import PreferenceLogps

CHOSEN, REJECTED = [-12.0, -3.5, -40.25], [-15.0, -2.0, -39.0]
REF_CHOSEN, REF_REJECTED = [-13.0, -3.0, -41.0], [-14.0, -2.5, -38.0]
LEN_CHOSEN, LEN_REJECTED = [4, 2, 9], [5, 3, 7]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def logps_fixture(token_logps=None):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    chosen_tok = rejected_tok = chosen_mask = rejected_mask = None
    if token_logps is not None:
        chosen_tok, chosen_mask = token_logps
    return PreferenceLogps(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), t(LEN_CHOSEN), t(LEN_REJECTED),
                           chosen_tok, rejected_tok, chosen_mask, rejected_mask)


def per_pair(fn):
    return [fn(i) for i in range(3)]


def check(losses, expected):
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)


def test_dpo_norm_by_hand():
    beta = 5.0
    out = DPONorm(DPONorm.Options(beta=beta)).posttrain_preference_loss(logps_fixture())

    def expected(i):
        h = (CHOSEN[i] - REF_CHOSEN[i]) / LEN_CHOSEN[i] - (REJECTED[i] - REF_REJECTED[i]) / LEN_REJECTED[i]
        return -math.log(sigmoid(beta * h))

    check(out.losses, per_pair(expected))


@pytest.mark.parametrize("normalize", [True, False])
def test_ipo_by_hand(normalize):
    tau = 0.25
    out = IPO(IPO.Options(tau=tau, length_normalize=normalize)).posttrain_preference_loss(logps_fixture())

    def expected(i):
        lc, lr = (LEN_CHOSEN[i], LEN_REJECTED[i]) if normalize else (1, 1)
        h = (CHOSEN[i] - REF_CHOSEN[i]) / lc - (REJECTED[i] - REF_REJECTED[i]) / lr
        return (h - 1 / (2 * tau)) ** 2

    check(out.losses, per_pair(expected))


@pytest.mark.parametrize("variant", ["robust", "conservative"])
def test_robust_dpo_by_hand(variant):
    beta, eps = 0.5, 0.2
    out = RobustDPO(RobustDPO.Options(beta=beta, epsilon=eps, variant=variant)).posttrain_preference_loss(
        logps_fixture())

    def expected(i):
        z = beta * ((CHOSEN[i] - REF_CHOSEN[i]) - (REJECTED[i] - REF_REJECTED[i]))
        if variant == "robust":
            return (-(1 - eps) * math.log(sigmoid(z)) + eps * math.log(sigmoid(-z))) / (1 - 2 * eps)
        return -(1 - eps) * math.log(sigmoid(z)) - eps * math.log(sigmoid(-z))

    check(out.losses, per_pair(expected))


def test_robust_dpo_with_no_noise_is_dpo():
    a = RobustDPO(RobustDPO.Options(beta=0.3, epsilon=0.0)).posttrain_preference_loss(logps_fixture())
    b = DPO(DPO.Options(beta=0.3)).posttrain_preference_loss(logps_fixture())
    check(a.losses, b.losses.tolist())


@pytest.mark.parametrize("options,gamma", [({"beta": 2.0, "gamma_beta_ratio": 0.5}, 1.0),
                                           ({"beta": 10.0, "gamma_beta_ratio": 0.3}, 3.0),
                                           ({"beta": 2.0, "gamma": 0.7}, 0.7),
                                           ({"beta": 2.0}, 1.0)])
def test_simpo_by_hand(options, gamma):
    plugin = SimPO(SimPO.parse_options(options, where="plugins.simpo"))
    assert plugin.options.margin == pytest.approx(gamma)
    out = plugin.posttrain_preference_loss(logps_fixture())
    beta = options["beta"]

    def expected(i):
        return -math.log(sigmoid(beta * CHOSEN[i] / LEN_CHOSEN[i] - beta * REJECTED[i] / LEN_REJECTED[i] - gamma))

    check(out.losses, per_pair(expected))


def test_simpo_refuses_both_margins(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"simpo": {"gamma": 1.0, "gamma_beta_ratio": 0.5}}))
    assert code == 2 and "gamma or gamma_beta_ratio, not both" in err


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_rpo_term_by_hand(reduction):
    token = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0], [-3.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    lp = logps_fixture((token, mask))
    lp.chosen_lengths = mask.sum(dim=1)
    term = RPO(RPO.Options(alpha=0.4, reduction=reduction)).posttrain_loss_terms(lp)["rpo_nll"]
    if reduction == "sequence":
        expected = 0.4 * ((3.0 / 2) + (0.5 / 1) + (5.0 / 3)) / 3
    else:
        expected = 0.4 * (3.0 + 0.5 + 5.0) / 6
    assert term.item() == pytest.approx(expected)


# --- parity with TRL's own losses ---------------------------------------------------------------


def _batch_losses(tiny_model_dir, tmp_path, plugins, trl_loss, trl_extra=None):
    """The loss of one batch through posttrain (plugins) and through TRL's DPOTrainer (trl_loss),
    with the same LoRA-perturbed model."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from posttrain.builtin import ArithmeticOptions, arithmetic
    from posttrain.trainers.preference import PreferenceTrainer

    data = Dataset.from_list(arithmetic(ArithmeticOptions(n=8, seed=5)))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def make(cls, **extra):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        args = DPOConfig(output_dir=str(tmp_path / cls.__name__), use_cpu=True, bf16=False,
                         gradient_checkpointing=False, report_to="none", per_device_train_batch_size=8, seed=0,
                         **trl_loss)
        peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = cls(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft, **extra)
        torch.manual_seed(1)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
        trainer.model.eval()
        return trainer

    ours = make(PreferenceTrainer, plugins=PluginSet(plugins))
    theirs = make(DPOTrainer)
    batch = theirs.data_collator([theirs.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        return (ours.compute_loss(ours.model, dict(batch)).item(), theirs.compute_loss(theirs.model, dict(batch)).item())


@pytest.mark.parametrize("name,plugins,trl_loss", [
    ("dpo_norm", [DPONorm(DPONorm.Options(beta=2.0))], {"loss_type": ["sigmoid_norm"], "beta": 2.0}),
    ("ipo", [IPO(IPO.Options(tau=0.5))], {"loss_type": ["ipo"], "beta": 0.5}),
    ("robust", [RobustDPO(RobustDPO.Options(beta=0.3, epsilon=0.15))],
     {"loss_type": ["robust"], "beta": 0.3, "label_smoothing": 0.15}),
    ("dpo+rpo", [DPO(DPO.Options(beta=0.2)), RPO(RPO.Options(alpha=0.7, reduction="token"))],
     {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7], "beta": 0.2}),
])
def test_parity_with_trl(tiny_model_dir, tmp_path, name, plugins, trl_loss):
    ours, theirs = _batch_losses(tiny_model_dir, tmp_path, plugins, trl_loss)
    assert abs(ours - theirs) < 1e-6, (ours, theirs)


# --- training ----------------------------------------------------------------------------------

ON_TRAIN = {"eval": {"source": "builtin:arithmetic", "max_examples": 16, "fraction": 0.0}}


@pytest.mark.slow
@pytest.mark.parametrize("plugins", [
    {"dpo_norm": {"beta": 2.0}},
    {"ipo": {"tau": 0.5}},
    {"robust_dpo": {"beta": 0.5, "epsilon": 0.1}},
    {"simpo": {"beta": 2.0, "gamma_beta_ratio": 0.5}},
    {"dpo": {"beta": 0.5}, "rpo": {"alpha": 0.5}},
    {"dpo_norm": {"beta": 2.0}, "rpo": {"alpha": 0.5}, "mask_format_tokens": {}},
], ids=lambda p: "+".join(p))
def test_each_loss_trains(cli, write_recipe, tmp_path, plugins):
    recipe = write_recipe(data=ON_TRAIN, plugins=plugins, eval={"generate": 0})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["after"]["heldout"]["loss"] < summary["before"]["heldout"]["loss"] - 1e-3
    if "rpo" in plugins:
        lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert any("loss/rpo_nll" in r for r in lines)


def test_two_loss_owners_fail_validation_naming_both(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"dpo_norm": {}, "rpo": {}, "simpo": {}}))
    assert code == 2 and "'dpo_norm' and 'simpo' both implement 'posttrain_preference_loss'" in err


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_simpo_loads_and_runs_no_reference(write_recipe, tmp_path, lora):
    from posttrain.trainers.preference import build_trainer
    from posttrain.pipeline import load_recipe
    from posttrain.trainers.preference import PreferenceTrainer
    from posttrain.validate import validate

    model = {"lora": {"r": 8, "alpha": 16}} if lora else {"lora": None}
    plan = validate(load_recipe(write_recipe(model=model, plugins={"simpo": {}}, training={"max_steps": 2})))
    trainer, _ = build_trainer(plan, tmp_path)
    assert trainer.uses_reference is False and trainer.ref_model is None
    # compute_ref_log_probs is the trainer's one way to reference log-probs (a separate model, or the
    # LoRA policy with its adapter disabled): count its calls
    calls = []
    original = PreferenceTrainer.compute_ref_log_probs
    trainer.compute_ref_log_probs = lambda *a, **k: calls.append(1) or original(trainer, *a, **k)
    trainer.train()
    assert trainer.state.global_step == 2
    assert calls == []
    # and DPO, by contrast, does run a reference pass
    plan = validate(load_recipe(write_recipe(model=model, plugins={"dpo": {}}, training={"max_steps": 1})))
    dpo_trainer, _ = build_trainer(plan, tmp_path / "dpo")
    dpo_calls = []
    dpo_trainer.compute_ref_log_probs = lambda *a, **k: dpo_calls.append(1) or original(dpo_trainer, *a, **k)
    dpo_trainer.train()
    assert len(dpo_calls) == 1
    assert (dpo_trainer.ref_model is None) == lora


# --- format-token masking ----------------------------------------------------------------------


def test_format_mask_keeps_only_unshared_or_ordinary_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos, start = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    # rows: chosen 0, chosen 1, rejected 0, rejected 1; prompt = first 2 tokens
    ids = torch.tensor([[5, 6, 40, 41, eos], [5, 6, 42, start, 0],
                        [5, 6, 43, eos, 0], [5, 6, 44, 45, 46]])
    completion = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 0],
                               [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    keep = MaskFormatTokens().posttrain_token_mask(input_ids=ids, completion_mask=completion, tokenizer=tok)
    expected = torch.ones_like(completion)
    expected[0, 4] = 0  # eos in both responses of pair 0
    expected[2, 3] = 0
    # pair 1: <|im_start|> only in the chosen response -> kept
    assert torch.equal(keep, expected)


@pytest.mark.slow
def test_masked_tokens_do_not_affect_the_gradient(write_recipe, tmp_path):
    """The gradient of the loss with respect to each token's log-prob is zero at masked positions
    (and non-zero at the other response tokens)."""
    from posttrain.trainers.preference import build_trainer
    from posttrain.pipeline import load_recipe
    from posttrain.validate import validate

    plan = validate(load_recipe(write_recipe(plugins={"dpo": {"beta": 0.5}, "mask_format_tokens": {}})))
    trainer, _ = build_trainer(plan, tmp_path)
    batch = device_batch(trainer)
    captured = {}
    model = trainer.model
    forward = model.forward

    def capturing_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        if torch.is_grad_enabled() and getattr(out, "log_probs", None) is not None and out.log_probs.requires_grad:
            out.log_probs.retain_grad()
            captured["log_probs"] = out.log_probs
        return out

    model.forward = capturing_forward
    model.train()
    trainer.compute_loss(model, dict(batch)).backward()
    grad = captured["log_probs"].grad  # positions 1.. (label positions), shape (2B, T-1)
    completion = batch["completion_mask"][:, 1:].bool()
    keep = trainer._apply_token_masks(dict(batch))["completion_mask"][:, 1:].bool()
    masked = completion & ~keep
    assert masked.any(), "the batch has no shared format token to mask"
    assert (grad[masked] == 0).all()
    assert (grad[completion & keep] != 0).all()
    # without the plugin, the same positions do get gradient
    plan = validate(load_recipe(write_recipe(plugins={"dpo": {"beta": 0.5}})))
    plain, _ = build_trainer(plan, tmp_path / "plain")
    plain_forward = plain.model.forward

    def capture_plain(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        if torch.is_grad_enabled() and out.log_probs.requires_grad:
            out.log_probs.retain_grad()
            captured["plain"] = out.log_probs
        return out

    plain.model.forward = capture_plain
    plain.model.train()
    plain.compute_loss(plain.model, dict(batch)).backward()
    assert (captured["plain"].grad[masked] != 0).all()


class _KeepLogps:
    """A DPO loss that keeps the PreferenceLogps it was given (to look at what a loss plugin receives)."""

    seen = []

    def __init__(self):
        from posttrain.plugins.dpo import DPO

        self.dpo = DPO()

    def __call__(self, logps):
        _KeepLogps.seen.append(logps)
        return self.dpo.posttrain_preference_loss(logps)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_loss_plugin_gets_the_references_per_token_log_probs(write_recipe, tmp_path, lora):
    """PreferenceLogps carries the reference's per-token log-probs: they sum to the sequence values and equal
    the reference's own log-probs computed from its logits (the adapter-disabled policy, or the frozen copy)."""
    from conftest import device_batch
    from posttrain.pipeline import load_recipe
    from posttrain.trainers.preference import build_trainer
    from posttrain.validate import validate

    model = {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "dtype": "float32"} if lora else \
        {"lora": None, "dtype": "float32"}
    trainer, _ = build_trainer(validate(load_recipe(write_recipe(model=model))), tmp_path)
    keep = _KeepLogps()
    trainer.preference_loss = keep
    batch = device_batch(trainer, 3)
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    lp = _KeepLogps.seen[-1]
    assert lp.ref_chosen_token_logps.shape == lp.chosen_token_logps.shape
    assert torch.allclose(lp.ref_chosen_token_logps.sum(1), lp.ref_chosen_logps, atol=1e-5)
    assert torch.allclose(lp.ref_rejected_token_logps.sum(1), lp.ref_rejected_logps, atol=1e-5)
    assert ((lp.ref_chosen_token_logps != 0) <= lp.chosen_mask.bool()).all()
    # by hand: the reference's logits -> log-softmax of the next token, on the chosen rows
    ref = trainer.ref_model if trainer.ref_model is not None else trainer.model
    rows = batch["input_ids"].shape[0] // 2
    ids, attention = batch["input_ids"][:rows], batch["attention_mask"][:rows]
    mask = batch["completion_mask"][:rows, 1:]
    import contextlib

    context = trainer.model.disable_adapter() if lora else contextlib.nullcontext()
    with torch.no_grad(), context:
        logits = ref(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    by_hand = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * mask
    assert torch.allclose(lp.ref_chosen_token_logps, by_hand, atol=1e-4)
