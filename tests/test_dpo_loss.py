"""The dpo plugin's loss: against a hand computation of the formula, and against TRL's own
sigmoid loss on the same batch (parity to 1e-6), with LoRA (adapter-disabled reference) and
with full fine-tuning (a separate reference copy)."""

import math

import pytest
import torch
from posttrain.plugins.dpo import DPO
from posttrain.plugin_set import PluginSet
from posttrain.types import PreferenceLogps


def _logps(chosen, rejected, ref_chosen, ref_rejected):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    n = len(chosen)
    return PreferenceLogps(t(chosen), t(rejected), t(ref_chosen), t(ref_rejected), t([3.0] * n), t([4.0] * n),
                           None, None, None, None)


def test_formula_by_hand():
    chosen, rejected = [-12.0, -3.5, -40.25], [-15.0, -2.0, -39.0]
    ref_chosen, ref_rejected = [-13.0, -3.0, -41.0], [-14.0, -2.5, -38.0]
    beta = 0.3
    out = DPO(DPO.Options(beta=beta)).posttrain_preference_loss(_logps(chosen, rejected, ref_chosen, ref_rejected))
    for i in range(3):
        margin = (chosen[i] - ref_chosen[i]) - (rejected[i] - ref_rejected[i])
        expected = -math.log(1 / (1 + math.exp(-beta * margin)))
        assert out.losses[i].item() == pytest.approx(expected, abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (chosen[i] - ref_chosen[i]))
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (rejected[i] - ref_rejected[i]))


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([-5.0], requires_grad=True)
    rejected = torch.tensor([-5.0], requires_grad=True)
    lp = PreferenceLogps(chosen, rejected, torch.tensor([-5.0]), torch.tensor([-5.0]), None, None, None, None,
                         None, None)
    DPO(DPO.Options(beta=1.0)).posttrain_preference_loss(lp).losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def _hand_logps(model, batch):
    """Sequence log-probs computed independently: plain forward, log-softmax, gather."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = batch["input_ids"][:, 1:]
    token = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token * batch["completion_mask"][:, 1:]).sum(dim=1)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_parity_with_trl_sigmoid(tiny_model_dir, tmp_path, use_lora):
    from datasets import Dataset
    from peft import LoraConfig
    from posttrain.builtin import ArithmeticOptions, arithmetic
    from posttrain.trainers.preference import PreferenceTrainer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    beta = 0.2
    data = Dataset.from_list(arithmetic(ArithmeticOptions(n=8, seed=5)))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def make(cls, **extra):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        args = DPOConfig(output_dir=str(tmp_path / cls.__name__), beta=beta, loss_type=["sigmoid"], use_cpu=True,
                         bf16=False, gradient_checkpointing=False, report_to="none", per_device_train_batch_size=8,
                         seed=0)
        peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM") if use_lora else None
        return cls(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft, **extra)

    ours = make(PreferenceTrainer, plugins=PluginSet([DPO(DPO.Options(beta=beta))]))
    theirs = make(DPOTrainer)
    if use_lora:  # make the adapter non-trivial so policy != reference, identically in both
        for trainer in (ours, theirs):
            torch.manual_seed(1)
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.data.normal_(0, 0.05)
    else:  # perturb the policy (not the reference) identically in both
        for trainer in (ours, theirs):
            torch.manual_seed(1)
            for p in trainer.model.parameters():
                p.data.add_(torch.randn_like(p) * 0.02)
    batch = theirs.data_collator([theirs.train_dataset[i] for i in range(8)])
    ours.model.eval(), theirs.model.eval()
    with torch.no_grad():
        loss_ours = ours.compute_loss(ours.model, dict(batch))
        loss_theirs = theirs.compute_loss(theirs.model, dict(batch))
    assert abs(loss_ours.item() - loss_theirs.item()) < 1e-6

    # The same number by hand: independent log-probs, the formula written out.
    policy = _hand_logps(ours.model, batch)
    if use_lora:
        with ours.model.disable_adapter():
            reference = _hand_logps(ours.model, batch)
    else:
        reference = _hand_logps(ours.ref_model, batch)
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    by_hand = (-torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr)))).mean()
    assert abs(loss_ours.item() - by_hand.item()) < 1e-5
    assert loss_ours.item() != pytest.approx(math.log(2), abs=1e-4)  # the check is not vacuous
    if use_lora:
        assert ours.ref_model is None  # no second copy of the model: the reference is the adapter-disabled model
