"""training.max_length and the rows it cuts or drops: rows whose tokens TRL cuts at max_length are counted per
stage and split (on screen and in summary.json), sft with packing drops and counts the rows truncation leaves
with no completion token (and refuses a run left with none), and `posttrain validate` refuses, before any model
loads, a recipe whose every row would be dropped at max_length.

Expected counts are computed here with the model's tokenizer loaded by transformers, as TRL tokenises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

NO_EVAL = {"fraction": 0.0}
TWO_STEPS = {"max_steps": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "logging_steps": 1}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _data(source, **extra) -> dict:
    return {"source": str(source), "options": {}, "eval": NO_EVAL, **extra}


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _shared(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _pair_cut(tok, row, max_length) -> tuple[bool, bool]:
    """(dropped, cut) of a plain preference pair as TRL's DPOTrainer treats it."""
    prompt = tok(row["prompt"])["input_ids"]
    chosen = tok(row["prompt"] + _with_eos(row["chosen"], tok.eos_token))["input_ids"]
    rejected = tok(row["prompt"] + _with_eos(row["rejected"], tok.eos_token))["input_ids"]
    prompt_len = min(_shared(prompt, chosen), _shared(prompt, rejected))
    dropped = prompt_len >= max_length
    return dropped, not dropped and max(len(chosen), len(rejected)) > max_length


def _completion_cut(tok, row, max_length) -> tuple[bool, bool]:
    """(dropped, cut) of a plain prompt/completion example as TRL's SFTTrainer and KTOTrainer treat it."""
    prompt = tok(row["prompt"])["input_ids"]
    full = tok(row["prompt"] + _with_eos(row["completion"], tok.eos_token))["input_ids"]
    dropped = _shared(prompt, full) >= max_length
    return dropped, not dropped and len(full) > max_length


def _count(rows, judge, tok, max_length) -> tuple[int, int]:
    marks = [judge(tok, r, max_length) for r in rows]
    return sum(d for d, _ in marks), sum(c for _, c in marks)


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# -- rows cut at max_length, counted --------------------------------------------------------------------------

def test_preference_rows_cut_at_max_length_are_counted(cli, write_recipe, tiny_model_dir, tmp_path):
    def rows(n, long):
        return [{"prompt": f"What is {i} plus one?", "chosen": f"It is {i + 1}." + " Indeed so." * (40 if i in long else 0),
                 "rejected": f"It is {i + 7}."} for i in range(n)]

    train, held = rows(18, {1, 4, 9, 11, 16}), rows(6, {0, 5})
    tok = _tokenizer(tiny_model_dir)
    assert _count(train, _pair_cut, tok, 40) == (0, 5) and _count(held, _pair_cut, tok, 40) == (0, 2)
    recipe = write_recipe(data=_data(_jsonl(tmp_path / "train.jsonl", train),
                                     eval={"source": str(_jsonl(tmp_path / "held.jsonl", held))}),
                          training={**TWO_STEPS, "max_length": 40})
    code, out, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    assert ("posttrain: warning: 5 of 18 train rows cut to training.max_length = 40 tokens (truncation_mode "
            "keep_start)") in out
    assert "2 of 6 eval rows cut to training.max_length = 40 tokens" in out
    summary = _summary(tmp_path / "run")
    assert summary["rows_cut_at_max_length"] == {"train": 5, "eval": 2}
    entry = next(e for e in summary["data_transforms"] if e["plugin"] == "trl.DPOTrainer" and e["split"] == "train")
    assert (entry["rows_in"], entry["rows_out"], entry["rows_cut"]) == (18, 18, 5)


def test_sft_rows_cut_at_max_length_are_counted_apart_from_those_dropped(cli, write_recipe, tiny_model_dir,
                                                                        tmp_path):
    rows = [{"prompt": "long question " * 30 if i in (2, 7) else f"What is {i} plus one?",
             "completion": f"It is {i + 1}." + " Indeed so." * (30 if i in (0, 3, 5, 10) else 0)} for i in range(12)]
    tok = _tokenizer(tiny_model_dir)
    assert _count(rows, _completion_cut, tok, 24) == (2, 4)
    recipe = write_recipe(stage="sft", plugins={}, data=_data(_jsonl(tmp_path / "sft.jsonl", rows)),
                          training={**TWO_STEPS, "max_length": 24})
    code, out, err = cli("validate", recipe)  # validation counts the rows TRL will drop, before any model loads
    assert code == 0 and "2 of 12 rows would be dropped at training.max_length = 24" in out, err
    code, out, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    assert "kept 10 of 12 train rows" in out
    assert "posttrain: warning: 4 of 10 train rows cut to training.max_length = 24 tokens (truncation_mode " \
           "keep_start)" in out
    summary = _summary(tmp_path / "run")
    assert summary["rows_cut_at_max_length"] == {"train": 4}
    cut = next(e for e in summary["data_transforms"] if e.get("rows_cut"))
    assert (cut["plugin"], cut["rows_in"], cut["rows_out"], cut["rows_cut"]) == ("trl.SFTTrainer", 10, 10, 4)


def test_kto_rows_cut_at_max_length_are_counted(cli, write_recipe, tiny_model_dir, tmp_path):
    rows = [{"prompt": f"What is {i} plus one?", "completion": f"It is {i + (1 if i % 2 else 7)}."
             + " Indeed so." * (30 if i in (1, 2, 8) else 0), "label": bool(i % 2)} for i in range(12)]
    tok = _tokenizer(tiny_model_dir)
    assert _count(rows, _completion_cut, tok, 24) == (0, 3)
    recipe = write_recipe(stage="kto", plugins={}, data=_data(_jsonl(tmp_path / "kto.jsonl", rows)),
                          training={**TWO_STEPS, "max_length": 24})
    code, out, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    assert "3 of 12 train rows cut to training.max_length = 24 tokens" in out
    assert _summary(tmp_path / "run")["rows_cut_at_max_length"] == {"train": 3}


# -- sft with packing --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sft_packing_drops_rows_left_without_a_completion_token_and_refuses_when_none_is_left(
        cli, write_recipe, tiny_model_dir, tmp_path, monkeypatch):
    rows = [{"prompt": ("long question " * (30 if i < 3 else 1)).strip(), "completion": "answer"} for i in range(12)]
    tok = _tokenizer(tiny_model_dir)
    assert _count(rows, _completion_cut, tok, 24) == (3, 0)
    recipe = write_recipe(stage="sft", plugins={}, data=_data(_jsonl(tmp_path / "some.jsonl", rows)),
                          training={**TWO_STEPS, "max_length": 24, "packing": True})
    code, out, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    assert "kept 9 of 12 train rows: 3 examples with no completion token left" in out
    summary = _summary(tmp_path / "run")
    assert summary["last_logged"]["loss"] > 0

    # every prompt alone longer than max_length: refused, not trained at loss 0 (validate's own check is bypassed
    # here, to reach the run's)
    import posttrain.lengths

    monkeypatch.setattr(posttrain.lengths, "check_lengths", lambda plan: [])
    rows = [{"prompt": "long question " * 30, "completion": "answer"} for _ in range(12)]
    recipe = write_recipe(stage="sft", plugins={}, data=_data(_jsonl(tmp_path / "all.jsonl", rows)),
                          training={**TWO_STEPS, "max_length": 24, "packing": True})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run2")
    assert code == 2, err
    assert "training.max_length" in err and "every train row was dropped" in err


# -- refused at validate ----------------------------------------------------------------------------------------

LONG = "long question " * 30

VALIDATE_CASES = {
    "sft": ({}, [{"prompt": LONG + str(i), "completion": "answer"} for i in range(8)]),
    "sft-messages": ({}, [{"messages": [{"role": "user", "content": LONG + str(i)},
                                        {"role": "assistant", "content": "answer"}]} for i in range(8)]),
    "sft-every-turn": ({}, [{"messages": [{"role": "user", "content": LONG + str(i)}, {"role": "assistant", "content": "a"},
                                          {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}
                            for i in range(8)]),
    "preference": ({"dpo": {}}, [{"prompt": LONG + str(i), "chosen": "yes", "rejected": "no"} for i in range(8)]),
    "kto": ({}, [{"prompt": LONG + str(i), "completion": "yes", "label": bool(i % 2)} for i in range(8)]),
    "reward_model": ({}, [{"prompt": "q", "chosen": LONG + str(i), "rejected": "no"} for i in range(8)]),
    "reward_model-chat": ({}, [{"prompt": [{"role": "user", "content": "q"}],
                                "chosen": [{"role": "assistant", "content": LONG + str(i)}],
                                "rejected": [{"role": "assistant", "content": "no"}]} for i in range(8)]),
}


def _validate_in_a_process(recipe: Path) -> subprocess.CompletedProcess:
    """`posttrain validate` in a fresh process that reports whether torch was imported."""
    code = ("import sys\nfrom posttrain.cli import main\ncode = main(['validate', sys.argv[1]])\n"
            "print('torch imported:', 'torch' in sys.modules, 'transformers' in sys.modules)\nsys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", list(VALIDATE_CASES))
def test_validate_refuses_when_every_row_would_be_dropped(write_recipe, tiny_model_dir, tmp_path, case):
    plugins, rows = VALIDATE_CASES[case]
    stage = case.split("-")[0]
    recipe = write_recipe(stage=stage, plugins=plugins, data=_data(_jsonl(tmp_path / "data.jsonl", rows)),
                          training={**TWO_STEPS, "max_length": 24})
    done = _validate_in_a_process(recipe)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "training.max_length" in done.stderr and "every one of the 8 rows" in done.stderr
    assert "would be dropped" in done.stderr and "raise training.max_length to at least" in done.stderr
    assert "torch imported: False False" in done.stdout


def test_validate_names_the_lengths_the_rows_need(cli, write_recipe, tiny_model_dir, tmp_path):
    rows = VALIDATE_CASES["sft"][1]
    tok = _tokenizer(tiny_model_dir)
    needs = [_shared(tok(r["prompt"])["input_ids"], tok(r["prompt"] + r["completion"] + tok.eos_token)["input_ids"])
             + 1 for r in rows]
    recipe = write_recipe(stage="sft", plugins={}, data=_data(_jsonl(tmp_path / "data.jsonl", rows)),
                          training={**TWO_STEPS, "max_length": 24})
    code, _, err = cli("validate", recipe)
    assert code == 2
    assert f"raise training.max_length to at least {max(needs)}" in err
    assert f"the shortest needs {min(needs)}" in err


def test_validate_notes_rows_that_would_be_dropped(cli, write_recipe, tmp_path):
    rows = [{"prompt": LONG if i < 3 else f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(10)]
    source = _jsonl(tmp_path / "pairs.jsonl", rows)
    code, out, err = cli("validate", write_recipe(data=_data(source), training={"max_length": 24}))
    assert code == 0, err
    assert "3 of 10 rows would be dropped at training.max_length = 24" in out


def test_validate_skips_the_check_without_a_local_tokenizer(cli, write_recipe, tmp_path):
    rows = VALIDATE_CASES["preference"][1]
    source = _jsonl(tmp_path / "pairs.jsonl", rows)
    code, out, err = cli("validate", write_recipe(model={"name_or_path": "someone/some-model"}, data=_data(source),
                                                  training={"max_length": 24}))
    assert code == 0, err
    assert "would be dropped" not in out


def test_validate_tokenises_as_transformers_does(tiny_model_dir):
    """The torch-free tokenisation validation uses matches the tokenizer transformers loads, for text and for
    conversations rendered with the chat template."""
    from posttrain.lengths import LocalTokenizer

    tok = _tokenizer(tiny_model_dir)
    ours = LocalTokenizer.load(str(tiny_model_dir))
    text = "What is 12 plus one? It is 13." + tok.eos_token
    assert ours.text(text) == tok(text)["input_ids"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "4"}]
    for messages, generation in ((chat, False), (chat[:2], True)):
        expected = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation, return_dict=True)
        assert ours.chat(messages, add_generation_prompt=generation) == list(expected["input_ids"])
