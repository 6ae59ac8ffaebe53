"""A user's own data: the public formats (TRL's documented dataset types, UltraFeedback, HH-RLHF, ShareGPT,
OpenAI's preference JSONL, Tülu 3, save_to_disk folders) read without preprocessing, the silent mistakes
made visible, bad rows refused by number and field before any model loads, and nothing lost on failure.

Every file here is a few rows in the exact schema of the public dataset it names."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from posttrain.data import load_splits
from posttrain.errors import UserError
from posttrain.pipeline import load_recipe
from posttrain.validate import validate

from conftest import read_jsonl

NO_EVAL = {"fraction": 0.0}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _data(source, **extra) -> dict:
    return {"source": str(source), "options": {}, "eval": NO_EVAL, **extra}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# -- rows in the public schemas ----------------------------------------------------------------------------

def text_rows(n=8):  # TRL's language-modelling type
    return [{"text": f"The number {i} comes before {i + 1}."} for i in range(n)]


def implicit_plain_rows(n=8):  # TRL's implicit-prompt preference type, plain
    return [{"chosen": f"What is {i} plus one? It is {i + 1}.", "rejected": f"What is {i} plus one? It is {i + 7}."}
            for i in range(n)]


def implicit_chat_rows(n=8):  # trl-lib/ultrafeedback_binarized
    return [{"chosen": [user(f"What is {i} plus one?"), assistant(f"It is {i + 1}.")],
             "rejected": [user(f"What is {i} plus one?"), assistant(f"It is {i + 7}.")],
             "score_chosen": 8.0, "score_rejected": 4.0} for i in range(n)]


def ultrafeedback_h4_rows(n=8):  # HuggingFaceH4/ultrafeedback_binarized
    rows = []
    for i in range(n):
        question = f"What is {i} plus one?"
        chosen = [user(question), assistant(f"It is {i + 1}.")]
        rows.append({"prompt": question, "prompt_id": f"{i:064x}", "chosen": chosen,
                     "rejected": [user(question), assistant(f"It is {i + 7}.")], "messages": chosen,
                     "score_chosen": 8.0, "score_rejected": 4.0})
    return rows


def hh_rows(n=8):  # Anthropic/hh-rlhf
    return [{"chosen": f"\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is {i} plus one?\n\nAssistant: "
                       f"It is {i + 1}.",
             "rejected": f"\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is {i} plus one?\n\nAssistant: "
                         f"No idea."} for i in range(n)]


def sharegpt_rows(n=8):  # ShareGPT / many Alpaca-style SFT sets
    return [{"id": f"conv{i}", "conversations": [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": f"What is {i} plus one?"}, {"from": "gpt", "value": f"It is {i + 1}."},
        {"from": "human", "value": "And plus two?"}, {"from": "gpt", "value": f"Then {i + 2}."}]} for i in range(n)]


def openai_preference_rows(n=8):  # OpenAI's preference fine-tuning JSONL
    return [{"input": {"messages": [user(f"What is {i} plus one?")], "tools": [], "parallel_tool_calls": True},
             "preferred_output": [assistant(f"It is {i + 1}.")],
             "non_preferred_output": [assistant(f"It is {i + 7}.")]} for i in range(n)]


def tulu_rows(n=8):  # allenai/tulu-3-sft-mixture
    return [{"id": f"t{i}", "source": "ai2-adapt-dev/x",
             "messages": ([{"role": "system", "content": "You are Tulu."}] if i % 2 else []) +
             [user(f"What is {i} plus one?"), assistant(f"It is {i + 1}.")]} for i in range(n)]


# -- the formats, read --------------------------------------------------------------------------------------

def _validated(cli, recipe) -> str:
    code, out, err = cli("validate", recipe)
    assert code == 0, err
    return out


def _first(write_recipe, **recipe):
    train, _, log = load_splits(load_recipe(write_recipe(**recipe)))
    return train[0], train, log


def test_trl_language_modelling_text_for_sft(cli, write_recipe, tmp_path):
    recipe = write_recipe(stage="sft", plugins={}, data=_data(_jsonl(tmp_path / "lm.jsonl", text_rows())))
    _validated(cli, recipe)
    first, train, _ = _first(write_recipe, stage="sft", plugins={}, data=_data(tmp_path / "lm.jsonl"))
    assert first == {"text": "The number 0 comes before 1."}


@pytest.mark.parametrize("stage", ["preference", "reward_model", "sft", "kto"])
def test_implicit_prompt_plain_pairs(cli, write_recipe, tmp_path, stage):
    source = _jsonl(tmp_path / "pairs.jsonl", implicit_plain_rows())
    extra = {"columns": {"completion": "chosen"}} if stage == "sft" else {}
    plugins = {"dpo": {}} if stage == "preference" else {}
    _validated(cli, write_recipe(stage=stage, plugins=plugins, data=_data(source, **extra)))
    first, _, log = _first(write_recipe, stage=stage, plugins=plugins, data=_data(source, **extra))
    assert first["prompt"] == "What is 0 plus one? It is"
    response = first["completion"] if stage == "sft" else first["chosen"]
    assert response == " 1."
    if stage != "sft":
        assert first["rejected"] == " 7."
    assert any("start their two responses share" in e["reason"] and e["rows_in"] == 8 for e in log)


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_implicit_prompt_chat_pairs_in_any_file_type(cli, write_recipe, tmp_path, suffix):
    rows = implicit_chat_rows()
    path = tmp_path / f"uf.{suffix}"
    if suffix == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        _jsonl(path, rows)
    _validated(cli, write_recipe(data=_data(path)))
    first, _, _ = _first(write_recipe, data=_data(path))
    assert first["prompt"] == [user("What is 0 plus one?")]
    assert first["chosen"] == [assistant("It is 1.")] and first["rejected"] == [assistant("It is 7.")]


@pytest.mark.parametrize("stage", ["preference", "reward_model"])
def test_ultrafeedback_binarized_as_h4_publishes_it(cli, write_recipe, tmp_path, stage):
    source = _jsonl(tmp_path / "h4.jsonl", ultrafeedback_h4_rows())
    plugins = {"dpo": {}} if stage == "preference" else {}
    out = _validated(cli, write_recipe(stage=stage, plugins=plugins, data=_data(source)))
    assert "repeated the prompt" in out and "read as a user turn" in out
    first, _, _ = _first(write_recipe, stage=stage, plugins=plugins, data=_data(source))
    assert first["prompt"] == [user("What is 0 plus one?")]  # the string prompt as a user turn
    assert first["chosen"] == [assistant("It is 1.")]  # the user turn no longer repeated in the response
    assert first["rejected"] == [assistant("It is 7.")]


def test_hh_rlhf_raw_is_detected_and_split_into_turns(cli, write_recipe, tmp_path):
    source = _jsonl(tmp_path / "hh.jsonl", hh_rows())
    out = _validated(cli, write_recipe(data=_data(source)))
    assert "read as format hh (detected" in out
    first, _, log = _first(write_recipe, data=_data(source))
    assert first["prompt"] == [user("Hi there"), assistant("Hello!"), user("What is 0 plus one?")]
    assert first["chosen"] == [assistant("It is 1.")] and first["rejected"] == [assistant("No idea.")]
    assert log[0]["plugin"] == "data format hh"


def test_sharegpt_conversations_are_detected(cli, write_recipe, tmp_path):
    source = _jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows())
    out = _validated(cli, write_recipe(stage="sft", plugins={}, data=_data(source)))
    assert "read as format sharegpt (detected" in out
    first, _, _ = _first(write_recipe, stage="sft", plugins={}, data=_data(source))
    assert first["messages"][:3] == [{"role": "system", "content": "Answer briefly."}, user("What is 0 plus one?"),
                                     assistant("It is 1.")]
    assert first["id"] == "conv0"


def test_sharegpt_named_with_its_column_mapped(cli, write_recipe, tmp_path):
    rows = [{"dialog": r["conversations"]} for r in sharegpt_rows()]
    source = _jsonl(tmp_path / "dialog.jsonl", rows)
    data = _data(source, format="sharegpt", columns={"conversations": "dialog"})
    _validated(cli, write_recipe(stage="sft", plugins={}, data=data))
    first, _, _ = _first(write_recipe, stage="sft", plugins={}, data=data)
    assert first["messages"][-1] == assistant("Then 2.") and "dialog" not in first


def test_sharegpt_mapped_to_messages_as_users_try_first(cli, write_recipe, tmp_path):
    source = _jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows())
    data = _data(source, columns={"messages": "conversations"})
    _validated(cli, write_recipe(stage="sft", plugins={}, data=data))
    first, _, _ = _first(write_recipe, stage="sft", plugins={}, data=data)
    assert first["messages"][1] == user("What is 0 plus one?")


def test_openai_preference_jsonl_is_detected(cli, write_recipe, tmp_path):
    source = _jsonl(tmp_path / "openai.jsonl", openai_preference_rows())
    out = _validated(cli, write_recipe(data=_data(source)))
    assert "read as format openai_preference" in out
    first, _, _ = _first(write_recipe, data=_data(source))
    assert first["prompt"] == [user("What is 0 plus one?")]
    assert first["chosen"] == [assistant("It is 1.")] and first["rejected"] == [assistant("It is 7.")]
    assert "input" not in first and "preferred_output" not in first


@pytest.mark.parametrize("kind", ["dataset", "datasetdict"])
def test_save_to_disk_folders(cli, write_recipe, tmp_path, kind):
    import datasets

    folder = tmp_path / "saved"
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(12)]
    if kind == "dataset":
        datasets.Dataset.from_list(rows).save_to_disk(str(folder))
        data = _data(folder)
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:9]),
                              "test": datasets.Dataset.from_list(rows[9:])}).save_to_disk(str(folder))
        data = {"source": str(folder), "options": {}, "eval": {"split": "test"}}
    _validated(cli, write_recipe(data=data))
    train, held, _ = load_splits(load_recipe(write_recipe(data=data)))
    assert train[0] == rows[0]
    if kind == "datasetdict":
        assert len(train) == 9 and [r["prompt"] for r in held] == ["q9", "q10", "q11"]
        code, _, err = cli("validate", write_recipe(data={**data, "eval": {"split": "validation"}}))
        assert code == 2 and "has no split 'validation'" in err and "train, test" in err


def test_a_format_plugin_is_refused_under_plugins(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(plugins={"dpo": {}, "hh": {}}))
    assert code == 2 and "plugins.hh" in err and "data format" in err and "data: {format: hh}" in err


def test_a_layout_a_format_would_read_is_hinted(cli, write_recipe, tmp_path):
    rows = [{"conversations": r["conversations"], "id": r["id"]} for r in sharegpt_rows()]
    for r in rows:  # a ShareGPT variant that detection does not claim: role/content-less turns named otherwise
        r["conversations"] = [{"from": t["from"], "value": t["value"], "weight": 1} for t in r["conversations"]]
    source = _jsonl(tmp_path / "odd.jsonl", rows)
    # sharegpt is detected here (it reads from/value turns whatever else they carry)
    out = _validated(cli, write_recipe(stage="sft", plugins={}, data=_data(source)))
    assert "sharegpt" in out


# -- the trained tokens -------------------------------------------------------------------------------------

def _trainer(write_recipe, tmp_path, stage, **recipe):
    import importlib

    recipe["training"] = {"max_length": 256, **recipe.get("training", {})}
    plan = validate(load_recipe(write_recipe(stage=stage, **recipe)))
    module = importlib.import_module(f"posttrain.trainers.{stage}")
    trainer, heldout = module.build_trainer(plan, tmp_path / "run")
    return plan, trainer, heldout


def _trained_text(trainer, i=0) -> str:
    example = trainer.train_dataset[i]
    tok = trainer.processing_class
    labels = example.get("labels")
    if labels is None:  # prompt-completion examples: TRL's completion mask
        labels = [t if m else -100 for t, m in zip(example["input_ids"], example["completion_mask"])]
    return tok.decode([t for t in labels if t != -100])


def test_sft_trains_every_assistant_turn_by_default(write_recipe, tmp_path):
    source = _jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows())
    _, trainer, heldout = _trainer(write_recipe, tmp_path, "sft", plugins={},
                                   data=_data(source, eval={"fraction": 0.25}))
    trained = _trained_text(trainer)
    # both replies, each with its end-of-turn token (the model learns to stop), and nothing else
    assert re.fullmatch(r"It is (\d+)\.<\|im_end\|>\nThen \d+\.<\|im_end\|>\n", trained), trained
    assert {"prompt", "completion"} <= set(heldout.column_names)  # greedy answers answer the last turn


def test_sft_assistant_turns_last(write_recipe, tmp_path):
    source = _jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows())
    _, trainer, _ = _trainer(write_recipe, tmp_path, "sft", plugins={}, data=_data(source), assistant_turns="last")
    trained = _trained_text(trainer)
    assert "Then 2." in trained and "It is 1." not in trained


def test_sft_every_turn_loss_is_the_nll_of_the_replies(write_recipe, tmp_path):
    """The loss TRL computes on the every-turn examples is the mean NLL of the reply tokens, by hand."""
    import torch.nn.functional as F

    source = _jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows())
    _, trainer, _ = _trainer(write_recipe, tmp_path, "sft", plugins={}, data=_data(source),
                             model={"dtype": "float32"})
    batch = {k: v.to(trainer.model.device) for k, v in
             trainer.data_collator([trainer.train_dataset[i] for i in range(4)]).items()}
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = batch["labels"][:, 1:] != -100
    assert loss.item() == pytest.approx((-(logp * mask).sum() / mask.sum()).item(), rel=1e-5)


def test_sft_text_trains_every_token(write_recipe, tmp_path):
    source = _jsonl(tmp_path / "lm.jsonl", text_rows())
    _, trainer, _ = _trainer(write_recipe, tmp_path, "sft", plugins={}, data=_data(source))
    assert _trained_text(trainer).replace(" ", "") == "Thenumber0comesbefore1.<|im_end|>"


def test_tulu_rows_with_a_system_prompt_train(write_recipe, tmp_path):
    source = _jsonl(tmp_path / "tulu.jsonl", tulu_rows())
    _, trainer, _ = _trainer(write_recipe, tmp_path, "sft", plugins={}, data=_data(source))
    assert len(trainer.train_dataset) == 8  # none dropped as fully masked
    texts = [_trained_text(trainer, i) for i in range(8)]
    assert all(t.startswith(f"It is {i + 1}.") for i, t in enumerate(texts))


def test_assistant_only_loss_without_generation_markers_is_refused_by_validate(cli, write_recipe, tmp_path):
    source = _jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows())
    code, _, err = cli("validate", write_recipe(stage="sft", plugins={}, data=_data(source),
                                                training={"assistant_only_loss": True}))
    assert code == 2 and "training.assistant_only_loss" in err and "generation" in err and "assistant_turns" in err


def test_preference_tokens_of_an_implicit_chat_pair(write_recipe, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "uf.parquet"
    pq.write_table(pa.Table.from_pylist(implicit_chat_rows()), path)
    _, trainer, _ = _trainer(write_recipe, tmp_path, "preference", data=_data(path))
    tok, example = trainer.processing_class, trainer.train_dataset[0]
    assert tok.decode(example["prompt_ids"]) == "<|im_start|>user\nWhat is 0 plus one?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(example["chosen_ids"]).startswith("It is 1.")
    assert tok.decode(example["rejected_ids"]).startswith("It is 7.")


def test_reward_model_tokens_of_ultrafeedback_h4(write_recipe, tmp_path):
    source = _jsonl(tmp_path / "h4.jsonl", ultrafeedback_h4_rows())
    _, trainer, _ = _trainer(write_recipe, tmp_path, "reward_model", plugins={}, data=_data(source))
    text = trainer.processing_class.decode(trainer.train_dataset[0]["chosen_ids"])
    assert text.count("What is 0 plus one?") == 1 and text.count("It is 1.") == 1


# -- whole runs ---------------------------------------------------------------------------------------------

TWO_STEPS = {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1}


@pytest.mark.parametrize("case", ["h4-preference", "openai-preference", "sharegpt-sft", "plain-reward_model"])
def test_public_formats_run(cli, write_recipe, tmp_path, case):
    rows, stage, plugins = {"h4-preference": (ultrafeedback_h4_rows(), "preference", {"dpo": {}}),
                            "openai-preference": (openai_preference_rows(), "preference", {"dpo": {}}),
                            "sharegpt-sft": (sharegpt_rows(), "sft", {}),
                            "plain-reward_model": (implicit_plain_rows(), "reward_model", {})}[case]
    source = _jsonl(tmp_path / "data.jsonl", rows)
    recipe = write_recipe(stage=stage, plugins=plugins, data=_data(source, eval={"fraction": 0.25}),
                          training=TWO_STEPS)
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == 2 and summary["train_loss"] is not None


# -- silent mistakes, made visible ---------------------------------------------------------------------------

def test_a_prompt_repeated_in_the_responses_is_removed_and_counted(cli, write_recipe, tmp_path):
    chat = [{"prompt": [user(f"q{i}")], "chosen": [user(f"q{i}"), assistant(f"good {i}")],
             "rejected": [user(f"q{i}"), assistant(f"bad {i}")]} for i in range(8)]
    text = [{"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i}",
             "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}"} for i in range(8)]
    for name, rows, chosen in (("chat", chat, [assistant("good 0")]), ("text", text, " good 0")):
        source = _jsonl(tmp_path / f"{name}.jsonl", rows)
        data = _data(source, format=None)
        out = _validated(cli, write_recipe(data=data))
        assert "8 rows whose responses repeated the prompt" in out, name
        first, _, _ = _first(write_recipe, data=data)
        assert first["chosen"] == chosen, name


def test_chat_data_in_a_csv_is_read_as_messages(cli, write_recipe, tmp_path):
    import csv

    path = tmp_path / "chat.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        for r in implicit_chat_rows():  # as pandas writes a list column: Python's repr
            writer.writerow({"prompt": str([r["chosen"][0]]), "chosen": str(r["chosen"][1:]),
                             "rejected": str(r["rejected"][1:])})
    out = _validated(cli, write_recipe(data=_data(path)))
    assert "conversations written as text read as messages" in out
    first, _, _ = _first(write_recipe, data=_data(path))
    assert first["prompt"] == [user("What is 0 plus one?")] and first["chosen"] == [assistant("It is 1.")]


@pytest.mark.parametrize("data, field", [
    ({"eval": {"split": "test"}}, "data.eval.split"),
    ({"split": "test"}, "data.split"),
])
def test_a_split_a_file_does_not_have_is_refused(cli, write_recipe, tmp_path, data, field):
    source = _jsonl(tmp_path / "p.jsonl", implicit_plain_rows())
    code, _, err = cli("validate", write_recipe(data={"source": str(source), "options": {}, **data}))
    assert code == 2 and f"{field}:" in err and "has one split" in err


def test_builtin_datasets_have_one_split(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(data={"eval": {"split": "test"}}))
    assert code == 2 and "data.eval.split" in err and "built-in dataset" in err


def test_rows_dropped_by_length_are_counted_and_all_dropped_is_an_error(cli, write_recipe, tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "yes " * (2 if i < 10 else 40), "rejected": "no"} for i in range(18)]
    source = _jsonl(tmp_path / "pairs.jsonl", rows)
    recipe = write_recipe(stage="reward_model", plugins={}, data=_data(source),
                          training={**TWO_STEPS, "max_length": 40})
    code, out, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    assert "kept 10 of 18 train rows: 8 pairs longer than training.max_length = 40" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    entry = next(e for e in summary["data_transforms"] if e["plugin"] == "trl.RewardTrainer")
    assert (entry["split"], entry["rows_in"], entry["rows_out"]) == ("train", 18, 10)
    assert summary["rows_cut_at_max_length"] == {"train": 0}  # dropped, never cut
    recipe = write_recipe(stage="reward_model", plugins={}, data=_data(source),
                          training={**TWO_STEPS, "max_length": 3})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run2")  # refused by validation (posttrain.lengths)
    assert code == 2 and "training.max_length" in err and "every one of the 18 rows" in err
    assert not (tmp_path / "run2").exists()


def test_sft_rows_left_fully_masked_are_counted(cli, write_recipe, tmp_path):
    rows = [{"prompt": ("long question " * (30 if i < 3 else 1)).strip(), "completion": "answer"} for i in range(12)]
    source = _jsonl(tmp_path / "sft.jsonl", rows)
    recipe = write_recipe(stage="sft", plugins={}, data=_data(source), training={**TWO_STEPS, "max_length": 24})
    code, out, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    entry = next(e for e in json.loads((tmp_path / "run" / "summary.json").read_text())["data_transforms"]
                 if e["plugin"] == "trl.SFTTrainer")
    assert (entry["rows_in"], entry["rows_out"]) == (12, 9) and "no completion token left" in entry["reason"]


def test_a_verifier_without_its_gold_column_is_refused(cli, online_recipe, tmp_path):
    source = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)}
                                                 for i in range(8)])
    code, _, err = cli("validate", online_recipe(data=_data(source), plugins={
        "group_relative": {}, "verify_gsm8k": {}}))
    assert code == 2 and "plugin 'verify_gsm8k' needs a 'ground_truth' column" in err
    code, _, err = cli("validate", online_recipe(data=_data(source, columns={"ground_truth": "answer"}), plugins={
        "group_relative": {}, "verify_gsm8k": {}}))
    assert code == 0, err


def test_identical_pairs_are_dropped_and_counted(cli, write_recipe, tmp_path):
    rows = implicit_plain_rows() + [{"prompt": "q", "chosen": "same", "rejected": "same"}] * 3
    source = _jsonl(tmp_path / "pairs.jsonl", rows)
    out = _validated(cli, write_recipe(data=_data(source)))
    assert "3 pair(s) with chosen == rejected will be dropped" in out
    train, _, log = load_splits(load_recipe(write_recipe(data=_data(source))))
    assert len(train) == 8
    assert any(e["rows_in"] == 11 and e["rows_out"] == 8 and "chosen == rejected" in e["reason"] for e in log)


# -- bad rows: exit 2 at validation, naming the row and the field --------------------------------------------

GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


def _bad_file(tmp_path, case) -> Path:
    path = tmp_path / f"{case}.jsonl"
    good = [json.dumps(GOOD).encode()] * 3
    if case == "missing":
        lines = good + [json.dumps({"prompt": "p", "chosen": "a"}).encode()]
    elif case == "null":
        lines = good + [json.dumps({**GOOD, "rejected": None}).encode()]
    elif case == "utf8":  # past the first 64 KiB
        lines = [json.dumps({**GOOD, "prompt": "x" * 1000}).encode()] * 80 + [b'{"prompt": "caf\xe9", "chosen": "a", '
                                                                             b'"rejected": "b"}']
    elif case == "mixed":
        lines = good + [json.dumps({**GOOD, "chosen": [assistant("a")]}).encode()]
    elif case == "truncated":
        lines = good + [b'{"prompt": "p", "chosen": "a", "rej']
    else:
        raise AssertionError(case)
    path.write_bytes(b"\n".join(lines) + (b"" if case == "truncated" else b"\n"))
    return path


@pytest.mark.parametrize("case, row, words", [
    ("missing", 4, "'rejected' is missing"),
    ("null", 4, "'rejected' is null"),
    ("utf8", 81, "not valid UTF-8"),
    ("mixed", 4, "is messages where row 1's is text"),
    ("truncated", 4, "looks cut off"),
])
def test_bad_rows_exit_2_naming_the_row(cli, write_recipe, tmp_path, case, row, words):
    recipe = write_recipe(data=_data(_bad_file(tmp_path, case)))
    code, _, err = cli("validate", recipe)
    assert code == 2 and f"row {row}" in err and words in err and "fix:" in err, err
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 2 and f"row {row}" in err and not (tmp_path / "run").exists()


def test_a_conversation_ending_on_a_user_turn_is_refused(cli, write_recipe, tmp_path):
    rows = [{"messages": [user("q"), assistant("a")]}] * 2 + [{"messages": [user("q"), assistant("a"), user("more?")]}]
    code, _, err = cli("validate", write_recipe(stage="sft", plugins={}, data=_data(_jsonl(tmp_path / "c.jsonl", rows))))
    assert code == 2 and "row 3" in err and "ends on a user turn" in err


def test_a_bad_row_of_a_dataset_folder_is_refused_when_it_loads(write_recipe, tmp_path):
    folder = tmp_path / "hub-like"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [GOOD, GOOD, {**GOOD, "chosen": ""}])
    with pytest.raises(UserError, match="row 3: 'chosen' is empty"):
        load_splits(load_recipe(write_recipe(data=_data(folder))))


# -- nothing lost --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_does_not_block_the_rerun(write_recipe, tmp_path):
    recipe = write_recipe(training=TWO_STEPS)
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", "run", str(recipe), "--output-dir", str(run)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "recipe.yaml").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # as an out-of-memory kill or a crash: no cleanup runs
    proc.wait()
    assert (run / "recipe.yaml").exists() and not (run / "summary.json").exists()
    rerun = subprocess.run([sys.executable, "-m", "posttrain", "run", str(recipe), "--output-dir", str(run)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "replacing the run" in rerun.stdout and (run / "summary.json").exists()


def test_a_folder_that_is_not_a_run_is_never_replaced(cli, write_recipe, tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("my own file")
    code, _, err = cli("run", write_recipe(training=TWO_STEPS), "--output-dir", run)
    assert code == 2 and "already exists" in err and (run / "notes.txt").read_text() == "my own file"


def test_overwrite_keeps_the_old_run_until_the_new_data_passes(cli, write_recipe, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("run", write_recipe(training=TWO_STEPS), "--output-dir", run)
    assert code == 0, err
    before = {p.relative_to(run): p.stat().st_size for p in run.rglob("*") if p.is_file()}
    folder = tmp_path / "hub-like"  # read when the run loads (like a hub dataset): a bad row found then
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [GOOD, GOOD, {**GOOD, "rejected": None}])
    code, _, err = cli("run", write_recipe(data=_data(folder), training=TWO_STEPS), "--output-dir", run, "--overwrite")
    assert code == 2 and "row 3" in err and "kept as it was" in err
    assert {p.relative_to(run): p.stat().st_size for p in run.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".run.replaced-*"))
    # with good data the old run is replaced
    _jsonl(folder / "train.jsonl", [GOOD] * 8)
    code, out, err = cli("run", write_recipe(data=_data(folder), training=TWO_STEPS), "--output-dir", run, "--overwrite")
    assert code == 0, err
    assert "is replaced (--overwrite)" in out and not list(tmp_path.glob(".run.replaced-*"))


def test_the_samples_an_iterative_error_points_to_exist(cli, tiny_model_dir, tmp_path):
    from test_iterative import _recipe

    recipe = _recipe(tiny_model_dir, tmp_path, plugins={"dpo": {}, "online_plugins:Constant": {"value": 1.0}})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 2 and "samples.jsonl" in err
    path = Path(err.split("samples are in ")[1].split()[0].rstrip(";,"))
    assert path.is_file() and len(read_jsonl(path)) == 8
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")  # the same command again: not blocked
    assert code == 2 and "kept no pair" in err


# -- a second pass: what validate can know, mixed columns, messages that point at the real cause --------------

def test_a_column_mixing_text_and_numbers_is_read_as_text(cli, online_recipe, tmp_path):
    rows = [{"prompt": "What is 50 + 4?", "ground_truth": "54"}, {"prompt": "What is 20 + 2?", "ground_truth": 22},
            {"prompt": "What is 1 + 2?", "ground_truth": 3}, {"prompt": "What is 1 + 3?", "ground_truth": "4"}]
    data = _data(_jsonl(tmp_path / "mixed.jsonl", rows))
    recipe = online_recipe(plugins={"verify_gsm8k": {}, "group_relative": {}}, data=data)
    out = _validated(cli, recipe)
    assert "column 'ground_truth' holds text (first in row 1) and number (first in row 2); every value read as " \
           "text" in out
    train, _, log = load_splits(load_recipe(recipe))
    assert train["ground_truth"] == ["54", "22", "3", "4"]
    assert any("every value read as text" in entry["reason"] for entry in log)


def test_a_column_mixing_answers_and_mappings_is_refused_naming_the_row(cli, online_recipe, tmp_path):
    rows = [{"prompt": "a", "extra": "x"}, {"prompt": "b", "extra": {"k": 1}}]
    code, _, err = cli("validate", online_recipe(data=_data(_jsonl(tmp_path / "bad.jsonl", rows))))
    assert code == 2 and "(row 2, extra)" in err and "'extra' is a mapping where row 1's is a text" in err


def test_a_verifier_reading_the_completion_column_online_is_refused(cli, online_recipe, tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "completion": str(i + 1)} for i in range(8)]
    recipe = online_recipe(plugins={"verify_gsm8k": {"column": "completion"}, "group_relative": {}},
                           data=_data(_jsonl(tmp_path / "rows.jsonl", rows)))
    code, _, err = cli("validate", recipe)
    assert code == 2 and "plugins.verify_gsm8k" in err
    assert "passes prompt, completion, completion_ids to reward sources as their own arguments" in err


def test_every_pair_identical_is_refused_by_validate(cli, write_recipe, tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "same", "rejected": "same"} for i in range(6)]
    code, _, err = cli("validate", write_recipe(data=_data(_jsonl(tmp_path / "same.jsonl", rows))))
    assert code == 2 and "every one of the 6 pairs" in err and "chosen == rejected" in err


def test_a_split_a_data_folder_does_not_have_is_refused_by_validate(cli, write_recipe, tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(4)]
    _jsonl(folder / "train.jsonl", rows)
    _jsonl(folder / "test.jsonl", rows)
    code, _, err = cli("validate", write_recipe(data=_data(folder, split="validation")))
    assert code == 2 and "data.split:" in err and "has the splits train, test" in err
    _validated(cli, write_recipe(data=_data(folder, split="test")))


def test_a_json_file_of_splits_is_read_by_split(cli, write_recipe, tmp_path):
    rows = lambda tag: [{"prompt": f"{tag}{i}", "chosen": "a", "rejected": "b"} for i in range(4)]  # noqa: E731
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": rows("train"), "test": rows("test")}))
    data = _data(path, eval={"split": "test", "fraction": 0.0})
    _validated(cli, write_recipe(data=data))
    train, held, _ = load_splits(load_recipe(write_recipe(data=data)))
    assert train["prompt"] == ["train0", "train1", "train2", "train3"] and held["prompt"][0] == "test0"
    code, _, err = cli("validate", write_recipe(data=_data(path, split="dev")))
    assert code == 2 and "holds the splits train, test; there is no split 'dev'" in err


@pytest.mark.parametrize("stage, columns, rows, words", [
    ("sft", {"completion": "text"}, text_rows(4), "the data's own columns (text) already make the sft stage's layout"),
    ("preference", {"prompt": "chosen"}, [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 4,
     "data.columns maps prompt: chosen, which moves 'chosen' to 'prompt'"),
    ("preference", {}, [{"completion": f"answer {i}", "label": i % 2 == 0} for i in range(4)],
     "unpaired feedback (a completion marked good or bad) is trained by the kto stage"),
])
def test_a_missing_column_message_names_the_real_cause(cli, write_recipe, tmp_path, stage, columns, rows, words):
    source = _jsonl(tmp_path / "rows.jsonl", rows)
    code, _, err = cli("validate", write_recipe(stage=stage, plugins={} if stage == "sft" else {"dpo": {}},
                                                data=_data(source, columns=columns)))
    assert code == 2 and words in err, err


def test_an_implicit_prompt_never_ends_inside_a_word_of_either_response(write_recipe, tmp_path):
    rows = [{"chosen": "Answer: 30 + 35 = 65", "rejected": "Answer: 30 + 35 = 6 apples"},
            {"chosen": "Answer: 30 + 35 = 6 apples", "rejected": "Answer: 30 + 35 = 65"}]
    train, _, _ = load_splits(load_recipe(write_recipe(data=_data(_jsonl(tmp_path / "pairs.jsonl", rows)))))
    assert train["prompt"] == ["Answer: 30 + 35 ="] * 2
    assert train["chosen"] == [" 65", " 6 apples"] and train["rejected"] == [" 6 apples", " 65"]


def test_a_verifier_gold_mapping_is_refused_and_a_dotted_path_reads_inside_it(cli, online_recipe, tmp_path):
    from posttrain.rewards import load_plugin, score_completions

    rows = [{"prompt": f"What is {i} + 1?", "reward_model": {"ground_truth": str(i + 1), "style": "rule"}}
            for i in range(8)]
    source = _jsonl(tmp_path / "verl.jsonl", rows)
    code, _, err = cli("validate", online_recipe(plugins={"verify_gsm8k": {"column": "reward_model"},
                                                          "group_relative": {}}, data=_data(source)))
    assert code == 2 and "data.source (row 1)" in err and "'reward_model' is a mapping, not a gold answer" in err
    assert "column: reward_model.ground_truth" in err
    recipe = online_recipe(plugins={"verify_gsm8k": {"column": "reward_model.ground_truth"}, "group_relative": {}},
                           data=_data(source))
    _validated(cli, recipe)
    plugin = load_plugin("verify_gsm8k", column="reward_model.ground_truth")
    assert score_completions(plugin, ["It is 1.", "It is 3."],
                             reward_model=[rows[0]["reward_model"], rows[1]["reward_model"]]) == [10.0, 0.0]
    missing = _jsonl(tmp_path / "missing.jsonl", [{"prompt": "q", "reward_model": {"style": "rule"}}])
    code, _, err = cli("validate", online_recipe(plugins={"verify_gsm8k": {"column": "reward_model.ground_truth"},
                                                          "group_relative": {}}, data=_data(missing)))
    assert code == 2 and "'reward_model' has no field ground_truth (its keys: style)" in err
