"""PPO with a learned critic: GAE and the clipped value loss against hand computations, the KL
folded into the reward, a critic that learns a constant reward, checkpoint/resume of the critic, the
LoRA critic's memory (no second base), one completion per prompt, and a value model initialised
from a reward model."""

import math

import pytest
import torch
from conftest import read_jsonl

from posttrain.plugins.critic import clipped_value_loss
from posttrain.plugins.gae import gae, per_token_rewards


def _hand_gae(rewards, values, length, gamma, lam):
    """One sequence, straight from the definitions: δ_t = r_t + γV_{t+1} − V_t, A_t = Σ_k (γλ)^k δ_{t+k}."""
    v = list(values[:length]) + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(length)]
    adv = [sum((gamma * lam) ** k * deltas[t + k] for k in range(length - t)) for t in range(length)]
    return adv, [a + v[t] for t, a in enumerate(adv)]


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.5), (0.99, 0.0)])
def test_gae_by_hand_with_padding_and_kl(gamma, lam):
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    logps, ref = -torch.rand(3, 5), -torch.rand(3, 5)
    values = torch.randn(3, 5)
    rewards = torch.tensor([1.0, -0.5, 2.0])
    beta = 0.1
    token_rewards = per_token_rewards(rewards, mask, logps, ref, beta)
    adv, targets = gae(token_rewards, values, mask, gamma, lam)
    for i in range(3):
        n = int(mask[i].sum())
        r = [-beta * (logps[i, t] - ref[i, t]).item() for t in range(n)]
        r[-1] += rewards[i].item()
        assert token_rewards[i, :n].tolist() == pytest.approx(r, abs=1e-6)
        hand_adv, hand_targets = _hand_gae(r, values[i].tolist(), n, gamma, lam)
        assert adv[i, :n].tolist() == pytest.approx(hand_adv, abs=1e-5)
        assert targets[i, :n].tolist() == pytest.approx(hand_targets, abs=1e-5)
        assert (adv[i, n:] == 0).all() and (targets[i, n:] == 0).all()  # padding


def test_zero_critic_lambda_one_gives_the_kl_shaped_returns():
    torch.manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    logps, ref = -torch.rand(2, 4), -torch.rand(2, 4)
    token_rewards = per_token_rewards(torch.tensor([3.0, -1.0]), mask, logps, ref, 0.2)
    adv, targets = gae(token_rewards, torch.zeros(2, 4), mask, 1.0, 1.0)
    returns = token_rewards.flip(1).cumsum(1).flip(1) * mask  # Σ_{k ≥ t} r_k
    assert torch.allclose(adv, returns, atol=1e-6) and torch.allclose(targets, returns, atol=1e-6)


@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_by_hand(clip):
    values = torch.tensor([[0.5, 1.0, -0.2], [0.1, 0.9, 0.0]])
    old = torch.tensor([[0.0, 1.5, 0.0], [0.1, 0.2, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 0.3], [0.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, share = clipped_value_loss(values, old, targets, mask, clip)
    terms, clipped = [], 0
    for i in range(2):
        for t in range(3):
            if not mask[i, t]:
                continue
            a = (values[i, t] - targets[i, t]).item() ** 2
            if clip is None:
                terms.append(a)
                continue
            vc = old[i, t].item() + max(-clip, min(clip, (values[i, t] - old[i, t]).item()))
            b = (vc - targets[i, t].item()) ** 2
            terms.append(max(a, b))
            clipped += b > a + 1e-6  # (float32 ties are not clipping)
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), rel=1e-6)
    assert share.item() == pytest.approx(clipped / len(terms) if clip else 0.0)


PPO = {"online_plugins:DigitShare": {}, "critic": {"learning_rate": 1e-3}, "gae": {}, "advantage_norm": {}}


def _build(online_recipe, tmp_path, plugins=None, **overrides):
    from posttrain.pipeline import load_recipe
    from posttrain.trainers.online import build_trainer
    from posttrain.validate import validate

    recipe = online_recipe(plugins=plugins or PPO, **overrides)
    return build_trainer(validate(load_recipe(recipe)), tmp_path / "run")[0]


def test_lora_critic_holds_no_second_copy_of_the_base(online_recipe, tmp_path):
    trainer = _build(online_recipe, tmp_path)
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    critic_own = trainer.critic.trained_parameters()
    adapter = sum(p.numel() for n, p in model.named_parameters() if ".critic." in n)
    head = sum(p.numel() for p in trainer.critic.head.parameters())
    assert sum(p.numel() for p in critic_own) == adapter + head
    assert head == model.config.hidden_size + 1
    # the critic's forward pass runs on the same base tensors (no copy): every base weight it touches
    # is one of the policy model's own parameters
    seen = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.update(id(p) for p in mod.parameters(recurse=False)))
             for m in model.modules()]
    ids = torch.tensor([[1, 40, 41, 42]], device=trainer.args.device)
    trainer.critic.values(ids, torch.ones_like(ids), 2)
    for h in hooks:
        h.remove()
    policy_ids = {id(p) for p in model.parameters()}
    assert seen and seen <= policy_ids | {id(p) for p in trainer.critic.head.parameters()}
    assert {id(p) for p in base.values()} & seen
    # the policy's adapter is active again, and only it trains in the policy's optimizer
    assert model.active_adapter == "default"
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".critic." in n)
    print("critic parameters:", adapter + head, "base parameters:", sum(p.numel() for p in base.values()))


def test_one_completion_per_prompt_runs_with_a_critic(cli, online_recipe, tmp_path):
    recipe = online_recipe(plugins=PPO, training={"num_generations": 1, "beta": 0.05, "max_steps": 2})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    lines = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(lines) == 2 and all("critic/value_loss" in r and "kl_in_reward" in r for r in lines)
    assert all("kl" not in r for r in lines)  # with kl: reward, TRL's in-loss KL is off
    # without a critic one completion per prompt is refused
    code, _, err = cli("validate", online_recipe(training={"num_generations": 1}))
    assert code == 2 and "training.num_generations" in err and "critic" in err


@pytest.mark.slow
def test_critic_learns_a_constant_reward(online_recipe, tmp_path):
    """γ = λ = 1, no KL: every token's target is the sequence reward, 0.7; the critic's values go there."""
    plugins = {"online_plugins:Constant": {"value": 0.7}, "critic": {"learning_rate": 3e-3, "cliprange_value": None,
                                                                     "vf_coef": 1.0}, "gae": {"lam": 1.0}}
    trainer = _build(online_recipe, tmp_path, plugins=plugins, training={"max_steps": 25, "learning_rate": 1e-6})
    trainer.train()
    values = [h["critic/values_mean"] for h in trainer.state.log_history if "critic/values_mean" in h]
    losses = [h["critic/value_loss"] for h in trainer.state.log_history if "critic/value_loss" in h]
    assert values[0] == pytest.approx(0.0, abs=1e-6)  # a zero head at the start
    assert values[-1] == pytest.approx(0.7, abs=0.05), values
    assert losses[-1] < 0.05 * losses[0]


def test_checkpoint_and_resume_restore_the_critic_exactly(online_recipe, tmp_path):
    from posttrain.trainers.run import last_checkpoint

    training = {"max_steps": 2, "save_strategy": "steps", "save_steps": 2, "beta": 0.05}
    first = _build(online_recipe, tmp_path / "a", training=training)
    first.train()
    saved = [p.detach().clone().cpu() for p in first.critic.trained_parameters()]
    checkpoint = last_checkpoint(tmp_path / "a" / "run")
    assert checkpoint.name == "checkpoint-2" and (checkpoint / "critic.pt").is_file()
    second = _build(online_recipe, tmp_path / "b", training={**training, "max_steps": 2})
    before = [p.detach().clone().cpu() for p in second.critic.trained_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(saved, before))  # a fresh critic differs
    # --resume's path: transformers restores the optimizer, the trainer the critic; look right after
    loaded = {}
    load = second.critic.load

    def load_and_look(folder):
        load(folder)
        loaded["params"] = [p.detach().clone().cpu() for p in second.critic.trained_parameters()]

    second.critic.load = load_and_look
    second.train(resume_from_checkpoint=str(checkpoint))
    after = loaded["params"]
    assert all(torch.equal(a, b) for a, b in zip(saved, after))
    saved_state = torch.load(checkpoint / "critic.pt", weights_only=True)["optimizer"]["state"]
    assert saved_state and all(v["step"] == 2 for v in saved_state.values())  # two critic steps, saved


@pytest.mark.slow
def test_value_model_critic_from_a_reward_model(cli, online_recipe, tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = tmp_path / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm)
    first_values = {}
    for lora_r, normalize in ((0, None), (4, None), (4, {"mean": 3.0, "std": 2.0})):
        plugins = {**PPO, "critic": {"model": str(rm), "lora_r": lora_r, "learning_rate": 1e-3,
                                     "normalize": normalize}}
        run = tmp_path / f"run{lora_r}-{bool(normalize)}"
        code, _, err = cli("run", online_recipe(plugins=plugins, training={"max_steps": 2}), "--output-dir", run)
        assert code == 0, err
        lines = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
        assert all(math.isfinite(r["critic/value_loss"]) for r in lines)
        # initialised from the reward model: its head reads every token, so the values are not zero
        assert lines[0]["critic/values_mean"] != 0.0
        first_values[lora_r, bool(normalize)] = lines[0]["critic/values_mean"]
    # the same rollouts (same seed) valued before any critic step: normalised = (raw - mean) / std
    assert first_values[4, True] == pytest.approx((first_values[4, False] - 3.0) / 2.0, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("plugins, message", [
    ({"online_plugins:DigitShare": {}, "gae": {}}, "plugin 'gae' needs a plugin implementing posttrain_critic"),
    ({"online_plugins:DigitShare": {}, "critic": {}, "group_relative": {}}, "enable one of: gae"),
    ({"online_plugins:DigitShare": {}, "critic": {"model": "policy", "lora_r": 0}, "gae": {}}, "lora_r"),
    ({"online_plugins:DigitShare": {}, "critic": {"normalize": "heldout"}, "gae": {}}, "normalize applies"),
    ({"online_plugins:DigitShare": {}, "critic": {"model": "stages.rm", "normalize": {"mean": 0, "std": 0}},
      "gae": {}}, "positive"),
])
def test_critic_configuration_errors(cli, online_recipe, plugins, message):
    code, _, err = cli("validate", online_recipe(plugins=plugins))
    assert code == 2 and message in err, err


def test_the_policy_critic_needs_a_lora_policy(cli, online_recipe, tmp_path):
    code, _, err = cli("run", online_recipe(plugins=PPO, model={"lora": None}), "--output-dir", tmp_path / "run")
    assert code == 2 and "plugins.critic.model" in err and "LoRA policy" in err


# -- the critic's own parameters train, and only they (a LoRA critic's adapter is not frozen) ---------------


def _value_model_folder(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = tmp_path / "rm"
    if not (rm / "config.json").is_file():
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
        model.save_pretrained(rm)
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm)
    return rm


def _critic_options(kind, tmp_path, tiny_model_dir, **extra):
    options = {"learning_rate": 1e-2, "cliprange_value": None, "vf_coef": 1.0, **extra}
    if kind == "value_model":
        options.update(model=str(_value_model_folder(tmp_path, tiny_model_dir)), lora_r=4)
    return options


def _named_critic_parameters(trainer) -> dict:
    """The critic's trained parameters by name: adapter (or value model) weights and the head."""
    critic = trainer.critic
    owner = critic.model if hasattr(critic, "model") else trainer.accelerator.unwrap_model(trainer.model)
    ids = {id(p) for p in critic.trained_parameters()}
    named = {n: p for n, p in owner.named_parameters() if id(p) in ids}
    if hasattr(critic, "head"):
        named.update({f"head.{n}": p for n, p in critic.head.named_parameters()})
    assert len(named) == len(ids)
    return named


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["policy", "value_model"])
def test_a_ppo_run_trains_every_critic_parameter(kind, online_recipe, tmp_path, tiny_model_dir):
    plugins = {**PPO, "critic": _critic_options(kind, tmp_path, tiny_model_dir)}
    # three steps: the head starts at zero (no gradient reaches the adapter), then LoRA's B at zero (none reaches A)
    trainer = _build(online_recipe, tmp_path, plugins=plugins, training={"max_steps": 3, "beta": 0.05})
    named = _named_critic_parameters(trainer)
    adapter = [n for n in named if "lora_" in n]
    assert len(adapter) >= 4 and any("lora_B" in n for n in adapter), sorted(named)
    before = {n: p.detach().clone() for n, p in named.items()}
    trainer.train()
    unmoved = [n for n, p in named.items() if torch.equal(p.detach(), before[n])]
    assert not unmoved, f"critic parameters that never moved: {unmoved}"
    assert all(p.detach().abs().sum() > 0 for n, p in named.items() if "lora_B" in n)  # B starts at zero
    state = trainer.critic.optimizer.state
    assert len(state) == len(named) and all(v["step"] == 3 for v in state.values())
    logged = [h for h in trainer.state.log_history if "critic/value_loss" in h]
    for key in ("critic/grad_norm", "critic/explained_variance", "critic/explained_variance_last",
                "critic/values_mean", "critic/returns_mean", "critic/clipped_share"):
        assert all(key in h for h in logged), (key, logged[-1])


@pytest.mark.parametrize("kind", ["policy", "value_model"])
def test_the_critic_loss_moves_only_the_critic_and_falls_on_a_fixed_batch(kind, online_recipe, tmp_path,
                                                                          tiny_model_dir):
    plugins = {**PPO, "critic": _critic_options(kind, tmp_path, tiny_model_dir)}
    trainer = _build(online_recipe, tmp_path, plugins=plugins)
    critic = trainer.critic
    policy = trainer.accelerator.unwrap_model(trainer.model)
    critic_ids = {id(p) for p in critic.trained_parameters()}
    named = _named_critic_parameters(trainer)
    critic_before = {n: p.detach().clone() for n, p in named.items()}
    policy_params = {n: p for n, p in policy.named_parameters() if id(p) not in critic_ids}
    policy_before = {n: p.detach().clone() for n, p in policy_params.items()}
    generator = torch.Generator().manual_seed(0)
    device = trainer.args.device
    ids = torch.randint(3, 200, (4, 12), generator=generator).to(device)
    attention = torch.ones_like(ids)
    keep = 6
    targets = (0.5 + 0.3 * torch.randn(4, keep, generator=generator)).to(device)
    mask = torch.ones(4, keep, device=device)
    old = critic.values(ids, attention, keep)
    losses = []
    for _ in range(8):
        metrics = critic.train_on(ids, attention, keep, targets, old, mask, scale=1.0)
        # the gradients are the critic's own: no parameter of the policy model (the critic's adapter
        # included) holds a .grad that the policy's clipping or optimizer would see
        assert all(p.grad is None for p in policy.parameters())
        critic.step()
        losses.append(metrics["critic/value_loss"].item())
    assert losses[-1] < 0.5 * losses[0], losses
    unmoved = [n for n, p in named.items() if torch.equal(p.detach(), critic_before[n])]
    assert not unmoved, f"critic parameters the value loss never moved: {unmoved[:5]}"
    moved = [n for n, p in policy_params.items() if not torch.equal(p.detach(), policy_before[n])]
    assert not moved, f"the critic's loss moved policy parameters: {moved[:5]}"
    assert policy.active_adapter == "default" if kind == "policy" else True


@pytest.mark.parametrize("conversational", [True, False])
def test_a_value_model_reads_its_last_value_where_the_reward_model_reads(conversational, online_recipe, tmp_path,
                                                                          tiny_model_dir):
    """Initialised from a reward model, V at a completion's last token equals the reward model's
    (normalised) score of the same completion, for chat and plain prompts, ended (EOS) and truncated."""
    from posttrain.plugins.reward_model import RewardModel

    rm = _value_model_folder(tmp_path, tiny_model_dir)
    normalize = {"mean": 0.5, "std": 2.0}
    plugins = {**PPO, "critic": {"model": str(rm), "lora_r": 0, "normalize": normalize}}
    trainer = _build(online_recipe, tmp_path, plugins=plugins,
                     data={"options": {"n": 16, "conversational": conversational}})
    tokenizer = trainer.processing_class
    device = trainer.args.device
    rows = [trainer.train_dataset[i] for i in range(2)]
    texts = ["12 + 7 = 19", "the answer is 4"]
    prompt_ids = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True)
                  if conversational else tokenizer(r["prompt"])["input_ids"] for r in rows]
    prompt_ids = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompt_ids]
    completions = []  # (prompt row, text, completion ids): one ended with EOS and one truncated, per prompt
    for r, ids in zip(rows, prompt_ids, strict=True):
        for text in texts:
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            completions.append((r["prompt"], ids, text, tokens + [tokenizer.eos_token_id]))
            completions.append((r["prompt"], ids, text, tokens))
    width_p = max(len(c[1]) for c in completions)
    keep = max(len(c[3]) for c in completions)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(completions), width_p + keep), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, (_, p_ids, _, c_ids) in enumerate(completions):
        input_ids[i, width_p - len(p_ids):width_p] = torch.tensor(p_ids)  # prompts left-padded, as TRL does
        attention[i, width_p - len(p_ids):width_p] = 1
        input_ids[i, width_p:width_p + len(c_ids)] = torch.tensor(c_ids)  # completions right-padded
        attention[i, width_p:width_p + len(c_ids)] = 1
    values = trainer.critic.values(input_ids.to(device), attention.to(device), keep).cpu()
    source = RewardModel(RewardModel.parse_options({"model": str(rm), "normalize": normalize, "dtype": "float32"},
                                                   where="plugins.reward_model"))
    scores = source.posttrain_reward([c[0] for c in completions], [c[2] for c in completions])
    last = [values[i, len(c[3]) - 1].item() for i, c in enumerate(completions)]
    assert last == pytest.approx(scores, abs=1e-4)
    # the states before the other completion tokens are the plain causal ones (unchanged by the closing)
    critic = trainer.critic
    inner = critic.model
    with torch.no_grad():
        hidden = inner.model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).last_hidden_state
        plain = (inner.score(hidden[:, width_p - 1:-1]).squeeze(-1).float().cpu() - 0.5) / 2.0
    for i, c in enumerate(completions):
        n = len(c[3])
        assert values[i, :n - 1].tolist() == pytest.approx(plain[i, :n - 1].tolist(), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("iterations", [1, 2])
def test_value_clipping_acts_only_when_the_critic_steps_more_than_once_per_rollout(iterations, online_recipe,
                                                                                    tmp_path):
    """V_old is the value at sampling time. With one critic step per rollout batch (num_iterations 1, one
    optimizer step per generation batch) the trained values are V_old itself and the clip cannot act; with
    num_iterations 2 the second pass over each batch starts from moved values and is clipped."""
    plugins = {**PPO, "critic": {"learning_rate": 5e-2, "cliprange_value": 0.01}}
    trainer = _build(online_recipe, tmp_path, plugins=plugins,
                     training={"max_steps": 4, "num_iterations": iterations, "beta": 0.05})
    trainer.train()
    shares = [h["critic/clipped_share"] for h in trainer.state.log_history if "critic/clipped_share" in h]
    assert len(shares) == 4
    if iterations == 1:
        assert shares == [0.0] * 4
    else:
        assert shares[0] == 0.0 and shares[1] > 0.0 and shares[3] > 0.0, shares  # steps 2 and 4: second passes


@pytest.mark.slow
def test_compare_draws_the_critic_of_online_runs(online_recipe, cli, tmp_path):
    from posttrain.compare import figure, load_run

    run = tmp_path / "ppo"
    code, _, err = cli("run", online_recipe(plugins=PPO, training={"max_steps": 3, "beta": 0.05}), "--output-dir", run)
    assert code == 0, err
    fig = figure([load_run(run)])
    titles = [ax.get_title() for ax in fig.axes]
    assert "online: critic: explained variance of the returns (1 = perfect)" in titles
    ax = next(a for a in fig.axes if a.get_title() == "online: critic: value loss")
    logged = [r["critic/value_loss"] for r in read_jsonl(run / "metrics.jsonl") if "critic/value_loss" in r]
    assert list(ax.get_lines()[0].get_ydata()) == pytest.approx(logged)
