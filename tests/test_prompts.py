"""How prompts reach the model: the chat template (the model's, another tokenizer's, or the recipe's own), the
system prompt, text prompts as a user turn in the stages that train on their own samples, the pad token, and
the prompt-length limit of the generating stages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from posttrain.data import load_splits, prompt_form
from posttrain.models import has_chat_template, load_tokenizer
from posttrain.pipeline import load_recipe
from posttrain.trainers.prompts import _prompt_ids, limit_prompts, run_prompt_form
from posttrain.validate import validate


TEMPLATE = ("{% for m in messages %}[[{{ m['role'] }}]] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[[assistant]] {% endif %}")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _prompts(tmp_path, n=8, words=2) -> Path:
    return _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "x " * words + f"What is {i} plus 1?",
                                                "ground_truth": str(i + 1)} for i in range(n)])


def _online(online_recipe, tmp_path, **data):
    return online_recipe(plugins={"verify_gsm8k": {}, "group_relative": {}},
                         data={"source": str(_prompts(tmp_path)), "options": {}, "eval": {"fraction": 0.25}, **data})


# -- the form of text prompts ------------------------------------------------------------------------------------

def test_online_text_prompts_are_a_user_turn_for_a_model_with_a_chat_template(cli, online_recipe, tmp_path):
    run = tmp_path / "run"
    recipe = _online(online_recipe, tmp_path, system_prompt="Think, then answer.")
    code, out, err = cli("validate", recipe)
    assert code == 0, err
    assert "prompts:  text prompts as a user turn of the chat template, after the system prompt" in out
    train, _, _ = load_splits(load_recipe(recipe), form=validate(load_recipe(recipe)).prompt_form)
    assert train[0]["prompt"] == [{"role": "system", "content": "Think, then answer."},
                                  {"role": "user", "content": train[0]["prompt"][1]["content"]}]
    code, _, err = cli("run", recipe, "--output-dir", run)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["prompts"].startswith("text prompts as a user turn of the chat template")
    # held-out answers are generated in the form the stage trained on
    assert summary["after"]["answers"]["examples"][0]["prompt"].startswith("Think, then answer. | x x What is")


def test_prompt_format_raw_keeps_text_prompts(online_recipe, tmp_path):
    recipe = load_recipe(_online(online_recipe, tmp_path, prompt_format="raw"))
    plan = validate(recipe)
    assert not plan.prompt_form.chat
    train, _, _ = load_splits(recipe, form=plan.prompt_form)
    assert isinstance(train[0]["prompt"], str)


def test_offline_stages_keep_text_prompts_unless_asked(write_recipe, tmp_path):
    rows = [{"prompt": f"What is {i} plus 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(6)]
    source = {"source": str(_jsonl(tmp_path / "pairs.jsonl", rows)), "options": {}, "eval": {"fraction": 0.0}}
    recipe = load_recipe(write_recipe(data=source))
    assert not validate(recipe).prompt_form.chat
    recipe = load_recipe(write_recipe(data={**source, "prompt_format": "chat", "system_prompt": "Be brief."}))
    train, _, _ = load_splits(recipe, form=validate(recipe).prompt_form)
    assert train[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "What is 0 plus 1?"}]
    assert train[0]["chosen"] == [{"role": "assistant", "content": "1"}]


def test_a_system_prompt_with_text_kept_as_text_is_refused(cli, write_recipe, online_recipe, tmp_path):
    rows = [{"prompt": f"What is {i} plus 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(6)]
    source = {"source": str(_jsonl(tmp_path / "pairs.jsonl", rows)), "options": {}, "eval": {"fraction": 0.0}}
    code, _, err = cli("validate", write_recipe(data={**source, "system_prompt": "Be brief."}))
    assert code == 2 and "(row 1)" in err and "data.system_prompt is a message of a conversation" in err
    assert "prompt_format: chat" in err
    code, _, err = cli("validate", _online(online_recipe, tmp_path, system_prompt="Hi.", prompt_format="raw"))
    assert code == 2 and "data.system_prompt:" in err


def test_a_system_prompt_goes_before_conversations_that_have_none(write_recipe, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]}]
    recipe = load_recipe(write_recipe(stage="sft", plugins={}, data={
        "source": str(_jsonl(tmp_path / "chat.jsonl", rows)), "options": {}, "eval": {"fraction": 0.0},
        "system_prompt": "Shared."}))
    train, _, log = load_splits(recipe, form=validate(recipe).prompt_form)
    assert [m["content"] for m in train[0]["messages"]] == ["Shared.", "Hi", "Hello"]
    assert [m["content"] for m in train[1]["messages"]] == ["Own.", "Hi", "Hello"]
    assert any("1 conversations given the system prompt" in e["reason"] for e in log)


def test_builtin_data_keeps_its_own_form_under_auto(online_recipe):
    recipe = load_recipe(online_recipe(data={"source": "builtin:word_problems",
                                             "options": {"n": 8, "conversational": False}, "eval": {"fraction": 0.0}}))
    train, _, _ = load_splits(recipe, form=validate(recipe).prompt_form)
    assert isinstance(train[0]["prompt"], str)


def test_a_model_without_a_chat_template_keeps_text_prompts(online_recipe, tiny_model_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    for name in ("chat_template.jinja",):
        (bare / name).unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    recipe = load_recipe(_online(online_recipe, tmp_path, prompt_format="auto"))
    recipe.model.name_or_path = str(bare)
    assert has_chat_template(recipe.model) is False
    assert not prompt_form(recipe, False).chat


# -- chat templates, tokenizers and the pad token -----------------------------------------------------------------

def test_the_recipe_chat_template_is_used_by_every_stage_and_saved(cli, write_recipe, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Sure"}]}
            for i in range(8)]
    template = tmp_path / "mine.jinja"
    template.write_text(TEMPLATE)
    recipe = write_recipe(stage="sft", plugins={}, model={"chat_template": "mine.jinja"},
                          data={"source": str(_jsonl(tmp_path / "chat.jsonl", rows)), "options": {},
                                "eval": {"fraction": 0.25}}, training={"max_steps": 1, "max_length": 64})
    plan = validate(load_recipe(recipe))  # the file is read against the recipe's folder
    tok = load_tokenizer(plan.recipe, plan.recipe.model.name_or_path)
    assert tok.chat_template == TEMPLATE
    from posttrain.trainers.sft import prepare

    train, _, _ = load_splits(plan.recipe)
    prepared = prepare(plan, train, tok)  # several assistant turns: posttrain tokenises them itself
    assert "[[assistant]] Hello" in tok.decode(prepared[0]["input_ids"])
    run = tmp_path / "run"
    code, _, err = cli("run", recipe, "--output-dir", run)
    assert code == 0, err
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(run / "final").chat_template == TEMPLATE


def test_a_chat_template_that_is_not_jinja_or_a_file_is_refused(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(model={"chat_template": "{% for m in messages %}{{ m }"}))
    assert code == 2 and "model.chat_template: the chat template is not valid Jinja" in err
    code, _, err = cli("validate", write_recipe(model={"chat_template": "missing.jinja"}))
    assert code == 2 and "chat template file 'missing.jinja' does not exist" in err


def test_sft_chat_template_path_points_to_the_model_section(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(stage="sft", plugins={}, data={"columns": {"completion": "chosen"}},
                                                training={"chat_template_path": "x.jinja"}))
    assert code == 2 and "training.chat_template_path" in err and "model.chat_template" in err


def test_another_tokenizer_and_a_pad_token(cli, write_recipe, tiny_model_dir, tmp_path):
    other = tmp_path / "tokenizer"
    other.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, other / name)
    (other / "chat_template.jinja").write_text(TEMPLATE)
    recipe = load_recipe(write_recipe(model={"tokenizer": str(other), "pad_token": "<|im_end|>"}))
    tok = load_tokenizer(recipe, recipe.model.name_or_path)
    assert tok.chat_template == TEMPLATE and tok.pad_token == "<|im_end|>"
    bad = load_recipe(write_recipe(model={"pad_token": "<not-a-token>"}))
    from posttrain.errors import UserError

    with pytest.raises(UserError, match="'<not-a-token>' is not a token of the tokenizer's vocabulary"):
        load_tokenizer(bad, bad.model.name_or_path)
    code, _, err = cli("validate", write_recipe(model={"tokenizer": str(tmp_path)}))
    assert code == 2 and "model.tokenizer" in err and "not a tokenizer folder" in err


# -- the prompt-length limit -------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "drop"])
def test_max_prompt_length_cuts_or_drops_and_counts(online_recipe, tmp_path, side):
    rows = [{"prompt": ("many words here " * (20 if i % 2 else 1)) + f"What is {i}?", "ground_truth": str(i)}
            for i in range(8)]
    recipe = load_recipe(online_recipe(plugins={"verify_gsm8k": {}, "group_relative": {}}, data={
        "source": str(_jsonl(tmp_path / "p.jsonl", rows)), "options": {}, "eval": {"fraction": 0.0},
        "prompt_format": "raw", "max_prompt_length": 48, "prompt_truncation": side}))
    plan = validate(recipe)
    train, _, _ = load_splits(recipe, form=plan.prompt_form)
    tok = load_tokenizer(recipe, recipe.model.name_or_path)
    lengths = [len(_prompt_ids(tok, p)) for p in train["prompt"]]
    long = sum(n > 48 for n in lengths)
    assert long == 4  # independently: the tokenizer's own count
    out = limit_prompts(plan, train, tok, "train")
    assert all(len(_prompt_ids(tok, p)) <= 48 for p in out["prompt"])
    (entry,) = plan.data_log
    if side == "left":
        assert len(out) == 8 and entry["rows_cut"] == 4 and entry["rows_out"] == 8
        assert all(p.endswith(f"What is {i}?") for i, p in enumerate(out["prompt"]))  # the end is kept
    else:
        assert len(out) == 4 and entry["rows_out"] == 4 and "rows_cut" not in entry
        assert out["ground_truth"] == ["0", "2", "4", "6"]


def test_max_prompt_length_cuts_the_first_turn_of_a_conversation(online_recipe, tmp_path):
    recipe = load_recipe(online_recipe(plugins={"verify_gsm8k": {}, "group_relative": {}}, data={
        "source": str(_jsonl(tmp_path / "p.jsonl", [{"prompt": "word " * 60 + "What is 1?", "ground_truth": "1"}])),
        "options": {}, "eval": {"fraction": 0.0}, "system_prompt": "Sys.", "max_prompt_length": 40}))
    plan = validate(recipe)
    train, _, _ = load_splits(recipe, form=plan.prompt_form)
    tok = load_tokenizer(recipe, recipe.model.name_or_path)
    (prompt,) = limit_prompts(plan, train, tok, "train")["prompt"]
    assert prompt[0] == {"role": "system", "content": "Sys."} and prompt[1]["content"].endswith("What is 1?")
    assert len(_prompt_ids(tok, prompt)) <= 40


def test_max_prompt_length_is_for_the_generating_stages(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(data={"source": "builtin:arithmetic", "options": {"n": 16},
                                                      "max_prompt_length": 32}))
    assert code == 2 and "data.max_prompt_length" in err and "training.max_length" in err


def test_the_run_asks_the_tokenizer_when_validation_cannot_read_its_template(online_recipe, tmp_path):
    recipe = load_recipe(_online(online_recipe, tmp_path))
    plan = validate(recipe)
    assert run_prompt_form(plan).chat


# -- KTO data as LLaMA-Factory writes it ---------------------------------------------------------------------------

def test_kto_reads_a_conversation_and_a_label(cli, write_recipe, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": str(i + 1 if i % 2 else i + 5)}], "label": i % 2 == 1}
            for i in range(8)]
    recipe = write_recipe(stage="kto", plugins={}, data={"source": str(_jsonl(tmp_path / "kto.jsonl", rows)),
                                                         "options": {}, "eval": {"fraction": 0.0}})
    code, out, err = cli("validate", recipe)
    assert code == 0, err
    assert "8 conversations read as a prompt (every turn before the last) and a completion" in out
    train, _, _ = load_splits(load_recipe(recipe))
    assert train[1] == {"prompt": [rows[1]["messages"][0]], "completion": [rows[1]["messages"][1]], "label": True}
    rows[3]["messages"] = rows[3]["messages"][:1]  # a conversation without the reply
    code, _, err = cli("validate", write_recipe(stage="kto", plugins={}, data={
        "source": str(_jsonl(tmp_path / "bad.jsonl", rows)), "options": {}, "eval": {"fraction": 0.0}}))
    assert code == 2 and "(row 4, messages)" in err and "must be the assistant's reply" in err


def test_iterative_refuses_evaluation_during_a_round(cli, tiny_model_dir, tmp_path):
    recipe = {"stage": "iterative", "model": {"name_or_path": str(tiny_model_dir)},
              "data": {"source": "builtin:word_problems", "options": {"n": 16}, "eval": {"fraction": 0.25}},
              "plugins": {"dpo": {}, "verify_gsm8k": {}}, "training": {"eval_strategy": "steps", "eval_steps": 1}}
    import yaml

    path = tmp_path / "it.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = cli("validate", path)
    assert code == 2 and "training.eval_strategy: the iterative stage does not evaluate during a round" in err
