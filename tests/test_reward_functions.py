"""Plain reward functions named by import path where a plugin goes (TRL's reward-function signature, in
every stage that scores completions), and the token ids and truncation flags the reward hook gets."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import read_jsonl

import posttrain
import reward_functions
from posttrain.errors import UserError
from reward_functions import LONG, SHORT, RecordTokens

CHAT_ROWS = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}? Think, then answer."}],
              "solution": str(2 * i) if i % 4 else "no number here"} for i in range(32)]


def _rows(tmp_path, rows, name="rows.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _build(recipe_path, run_dir):
    from posttrain.pipeline import load_recipe
    from posttrain.trainers.online import build_trainer
    from posttrain.validate import validate

    return build_trainer(validate(load_recipe(recipe_path)), run_dir)


@pytest.fixture(autouse=True)
def _fresh_records():
    reward_functions.SEEN.clear()
    RecordTokens.seen.clear()
    yield
    reward_functions.SEEN.clear()
    RecordTokens.seen.clear()


def _check_generated(call, tokenizer, limit):
    """Token ids as generated: through the first EOS (truncated False), or the length limit without one
    (truncated True); the completion's text is their decoding."""
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert len(call["truncated"]) == len(call["completion_ids"]) == len(call["completions"])
    for completion, ids, truncated in zip(call["completions"], call["completion_ids"], call["truncated"]):
        assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
        assert truncated is (ids[-1] not in stop)
        assert truncated is (len(ids) == limit and not stop.intersection(ids))
        text = completion if isinstance(completion, str) else completion[0]["content"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


# -- an online run with open-r1-style functions ----------------------------------------------------


def test_open_r1_style_functions_train_online(cli, online_recipe, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    recipe = online_recipe(
        data={"source": str(_rows(tmp_path, CHAT_ROWS)), "options": {}, "eval": {"fraction": 0.25}},
        plugins={"reward_functions:format_reward": {}, "reward_functions:tag_count_reward": {"weight": 0.5},
                 "reward_functions:accuracy_reward": {"weight": 2.0}, "reward_functions:record_reward": {},
                 "reward_functions:RecordTokens": {}, "group_relative": {}},
        training={"max_steps": 2}, eval={"generate": 4, "max_new_tokens": 6})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    steps = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:  # each function is a source of its own, under its name
        for name in ("format_reward", "tag_count_reward", "accuracy_reward", "record_reward", "record_tokens"):
            assert f"rewards/{name}/mean" in m, sorted(m)
        assert m["rewards/format_reward/mean"] == 0.0 and m["rewards/record_reward/mean"] == 0.0
        assert m["record_reward/calls"] == 1.0  # log_metric reached TRL's metrics
    assert {"format_reward", "tag_count_reward", "accuracy_reward"} <= set(summary["reward_curve"][0])
    assert {"format_reward", "accuracy_reward"} <= set(summary["after"]["answers"]["by_source"])
    assert summary["plugins"][:3] == ["format_reward", "tag_count_reward", "accuracy_reward"]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    online = [c for c in reward_functions.SEEN if len(c["completions"]) == 8]
    heldout = [c for c in reward_functions.SEEN if len(c["completions"]) == 4]
    assert len(online) == 2 and len(heldout) == 2  # two steps; answers before and after
    for call in online + heldout:  # TRL's form: a message list per completion of a chat prompt
        assert all(isinstance(p, list) for p in call["prompts"])
        assert all(isinstance(c, list) and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
                   for c in call["completions"])
        assert set(call["columns"]) == {"solution"}  # the dataset's columns, the prompt left out as TRL does
        assert call["trainer_state"] is not None and call["trainer_state"].max_steps == 2
    assert [c["step"] for c in online] == [0, 1]  # the trainer's state when it scored the step's rollouts
    records = {len(c["completions"]): [] for c in RecordTokens.seen}
    for call in RecordTokens.seen:
        records[len(call["completions"])].append(call)
    for call in records[8]:  # TRL's generation: cut at max_completion_length
        _check_generated(call, tokenizer, 12)
        assert all(isinstance(c, list) for c in call["completions"])
    for call in records[4]:  # held-out greedy answers (model.generate): cut at eval.max_new_tokens
        _check_generated(call, tokenizer, 6)
        assert all(isinstance(c, str) for c in call["completions"])  # plugins get texts there, as before


def test_a_function_abstains_where_it_returns_none(online_recipe, tmp_path):
    recipe = online_recipe(data={"source": str(_rows(tmp_path, CHAT_ROWS)), "options": {}, "eval": {"fraction": 0.0}},
                           plugins={"reward_functions:accuracy_reward": {}, "group_relative": {}},
                           eval={"generate": 0})
    trainer, _ = _build(recipe, tmp_path / "run")
    seen = []
    rollouts = trainer.rollouts

    def spy(*args, **kwargs):
        seen.append(rollouts(*args, **kwargs))
        return seen[-1]

    trainer.rollouts = spy
    batch = [CHAT_ROWS[1]] * 4 + [CHAT_ROWS[4]] * 4  # a readable gold, then one without a number
    output = trainer._generate_and_score_completions(batch)
    scores = seen[0].rewards_by_source["accuracy_reward"]
    assert not torch.isnan(scores[:4]).any() and torch.isnan(scores[4:]).all()
    assert output["advantages"][4:].eq(0).all()
    assert posttrain.score("reward_functions:accuracy_reward", [[{"role": "assistant", "content": "it is 4"}]] * 3,
                           solution=["4", "5", "none"]) == [1.0, 0.0, None]


# -- the other stages: rejection sampling on plain-text prompts -------------------------------------


def test_functions_and_token_flags_in_rejection_sampling(cli, tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    plain = shutil.copytree(tiny_model_dir, tmp_path / "no-chat-template")  # its prompts stay plain text
    (plain / "chat_template.jinja").unlink()
    rows = [{"prompt": f"Count to {i}:", "solution": str(i)} for i in range(8)]
    recipe = tmp_path / "rs.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "rejection_sampling", "model": {"name_or_path": str(plain)},
        "data": {"source": str(_rows(tmp_path, rows)), "eval": {"fraction": 0.0}},
        "plugins": {"reward_functions:reward_len": {}, "reward_functions:record_reward": {},
                    "reward_functions:RecordTokens": {}, "reward_functions:MixedSampler": {}},
        "sampling": {"samples": 2, "prompts": 4, "max_new_tokens": 10, "batch_size": 4}}))
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert len(samples) == 4
    for s in samples:  # reward_len (TRL's docs) on plain-text completions, the other two score 0
        assert s["completions"] == [SHORT, LONG]
        assert s["by_source"]["reward_len"] == [-abs(20 - len(SHORT)), -abs(20 - len(LONG))]
    (call,) = reward_functions.SEEN
    assert call["completions"] == [SHORT, LONG] * 4
    assert call["prompts"][0] == f"Count to {call['columns']['solution'][0]}:"  # plain text, with its column
    assert call["trainer_state"] is None and call["step"] is None  # nothing trains here
    tokenizer = AutoTokenizer.from_pretrained(plain)
    (tokens,) = RecordTokens.seen
    short = tokenizer(SHORT, add_special_tokens=False)["input_ids"]
    long = tokenizer(LONG, add_special_tokens=False)["input_ids"]
    assert tokens["truncated"] == [False, True] * 4
    assert tokens["completion_ids"] == [short + [tokenizer.eos_token_id], long] * 4
    assert call["completion_ids"] == tokens["completion_ids"]


# -- the hook's new arguments online, from a sampler plugin ----------------------------------------


def test_reward_hook_gets_token_ids_and_truncation_online(online_recipe, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    recipe = online_recipe(plugins={"reward_functions:MixedSampler": {}, "reward_functions:RecordTokens": {},
                                    "group_relative": {}},
                           training={"max_steps": 1}, eval={"generate": 0})
    trainer, _ = _build(recipe, tmp_path / "run")
    trainer.train()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    short = tokenizer(SHORT, add_special_tokens=False)["input_ids"]
    long = tokenizer(LONG, add_special_tokens=False)["input_ids"]
    (call,) = RecordTokens.seen
    assert call["truncated"] == [False, True] * 4  # the long text was cut at max_completion_length (12)
    assert call["completion_ids"] == [short + [tokenizer.eos_token_id], long[:12]] * 4


def test_default_sampler_ids_stop_at_eos(tiny_model_dir):
    """model.generate pads the rows that ended early: the ids stop at the first EOS (kept), and a row without
    one is truncated."""
    from transformers import AutoTokenizer

    from posttrain.sampling import default_generate

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    class Generating(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, num_return_sequences, **kwargs):
            rows = [[50, 51, eos, pad, pad], [60, 61, 62, 63, 64]]
            return torch.cat([input_ids.repeat_interleave(num_return_sequences, 0), torch.tensor(rows)], dim=1)

    samples = default_generate(Generating(), tokenizer, ["a prompt"], 2, {"max_new_tokens": 5})
    assert samples.ids == [[[50, 51, eos], [60, 61, 62, 63, 64]]]
    assert samples.truncated == [[False, True]]
    assert samples.texts == [[tokenizer.decode([50, 51]), tokenizer.decode([60, 61, 62, 63, 64])]]


# -- mistakes, named --------------------------------------------------------------------------------


@pytest.mark.parametrize("function,completions,message", [
    ("broken_reward", ["a"],
     "reward function 'broken_reward' (reward_functions:broken_reward) failed: KeyError: 'answer'"),
    ("short_reward", ["a", "b"], "plugin 'short_reward' returned 1 rewards for 2 completions from hook "
                                 "'posttrain_reward'; expected one reward"),
    ("text_reward", ["a"], "plugin 'text_reward' must return a list with one float (or None to abstain) per "
                           "completion from hook 'posttrain_reward'; it returned list[1]('good')"),
])
def test_a_misbehaving_function_is_named(function, completions, message):
    with pytest.raises(UserError) as caught:
        posttrain.score(f"reward_functions:{function}", completions)
    assert message in str(caught.value)


def test_functions_work_outside_a_run():
    assert posttrain.score("reward_functions:reward_len", ["x" * 20, "x" * 25]) == [0.0, -5.0]
    assert posttrain.score("reward_functions:async_reward", ["abc"]) == [3.0]
    assert posttrain.score(posttrain.load_plugin("reward_functions:format_reward", weight=2.0),
                           [[{"role": "assistant", "content": "<think>hm</think> <answer>4</answer>"}]]) == [1.0]


@pytest.mark.parametrize("plugins,message", [
    ({"reward_functions:accuracy_reward": {}, "reward_functions:accuracy_reward_again": {}},
     "'reward_functions:accuracy_reward' and 'reward_functions:accuracy_reward_again' are both named "
     "'accuracy_reward'"),
    ({"reward_functions:format_reward": {"wieght": 1.0}},
     "unknown option 'wieght' for reward function 'format_reward' (did you mean 'weight'?)"),
    ({"reward_functions:NOT_A_FUNCTION": {}},
     "'reward_functions:NOT_A_FUNCTION' is neither a posttrain.Plugin subclass nor a function: it is an int"),
    ({"reward_functions:NotAPlugin": {}}, "is not a subclass of posttrain.Plugin"),
    ({"reward_functions:no_such_function": {}}, "cannot load plugin 'reward_functions:no_such_function'"),
    ({"reward_functions:accuracy_reward": {}}, "plugin 'accuracy_reward' needs a 'solution' column"),
])
def test_function_recipe_mistakes_exit_2(cli, online_recipe, plugins, message):
    code, _, err = cli("validate", online_recipe(plugins={**plugins, "group_relative": {}}))
    assert code == 2 and message in err, err
