"""Built-in data generation and loading from local files."""

import json

import pytest
from posttrain.builtin import ArithmeticOptions, arithmetic
from posttrain.data import load_splits
from posttrain.plugins.verify_gsm8k import VerifyGSM8K, last_number
from posttrain.pipeline import load_recipe


def test_arithmetic_pairs_are_right_and_wrong():
    records = arithmetic(ArithmeticOptions(n=300, seed=3))
    assert len(records) == 300
    for r in records:
        question = r["prompt"][0]["content"]
        a, op, b = question.removeprefix("What is ").rstrip("?").split()
        right = eval(f"{int(a)} {op} {int(b)}")  # noqa: S307 - our own generated digits
        assert r["ground_truth"] == str(right)
        assert r["chosen"][0]["content"].endswith(f"= {right}")
        assert not r["rejected"][0]["content"].endswith(f"= {right}")
        assert r["chosen"][0]["role"] == "assistant"
    assert arithmetic(ArithmeticOptions(n=50, seed=3)) == records[:50]  # seeded and prefix-stable
    assert arithmetic(ArithmeticOptions(n=50, seed=4)) != records[:50]


def test_plain_form():
    r = arithmetic(ArithmeticOptions(n=1, conversational=False))[0]
    assert isinstance(r["prompt"], str) and isinstance(r["chosen"], str) and r["prompt"].startswith("Question:")
    assert r["prompt"].endswith("=") and r["chosen"] == " " + r["ground_truth"] and r["rejected"] != r["chosen"]


def test_verifier_scores_the_chosen_answers():
    records = arithmetic(ArithmeticOptions(n=50, seed=1))
    plugin = VerifyGSM8K(VerifyGSM8K.Options(alpha=10.0))
    columns = {"ground_truth": [r["ground_truth"] for r in records]}
    assert plugin.posttrain_reward([r["chosen"] for r in records], columns) == [10.0] * 50
    assert plugin.posttrain_reward([r["rejected"] for r in records], columns) == [0.0] * 50
    assert plugin.posttrain_reward(["x"], {}) is None  # no gold column: abstain


@pytest.mark.parametrize("text,expected", [
    ("so the answer is 1,234 apples", 1234), ("-7", -7), ("3.50 then 4", 4), ("12.5", 12.5),
    ("no digits", None), ("#### 42", 42),
])
def test_last_number(text, expected):
    got = last_number(text)
    assert (got is None and expected is None) or float(got) == expected


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_files_load_with_mapping(write_recipe, tmp_path, fmt):
    rows = [{"q": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        path.write_text("q,chosen,rejected\n" + "".join(f"{r['q']},{r['chosen']},{r['rejected']}\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    recipe = load_recipe(write_recipe(data={"source": str(path), "options": {}, "columns": {"prompt": "q"},
                                            "eval": {"fraction": 0.25}}))
    train, held, _ = load_splits(recipe)
    assert len(train) == 15 and len(held) == 5
    assert set(train.column_names) == {"prompt", "chosen", "rejected"}
    assert train[0]["prompt"].startswith("question")


def test_eval_split_from_separate_source(write_recipe, tmp_path):
    train_file, eval_file = tmp_path / "t.jsonl", tmp_path / "e.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" for _ in range(7)))
    eval_file.write_text("".join(json.dumps({"prompt": "q", "chosen": "c", "rejected": "d"}) + "\n" for _ in range(3)))
    recipe = load_recipe(write_recipe(data={"source": str(train_file), "options": {},
                                            "eval": {"source": str(eval_file)}}))
    train, held, _ = load_splits(recipe)
    assert len(train) == 7 and len(held) == 3 and held[0]["prompt"] == "q"


def test_dataset_folder_with_splits_goes_through_load_dataset(write_recipe, tmp_path):
    """A dataset folder (as a hub dataset repository looks on disk) is read by datasets.load_dataset,
    the code path of a hub id, with data.split and data.eval.split."""
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    for split, n in (("train", 12), ("test", 4)):
        rows = [{"question": f"{split} {i}", "chosen": "a", "rejected": "b"} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(write_recipe(data={"source": str(folder), "options": {}, "split": "train",
                                            "columns": {"prompt": "question"}, "eval": {"split": "test"}}))
    train, held, _ = load_splits(recipe)
    assert len(train) == 12 and len(held) == 4 and held[0]["prompt"] == "test 0"


def test_dataset_without_the_needed_columns_is_refused_after_loading(write_recipe, tmp_path):
    from posttrain.errors import UserError

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    recipe = load_recipe(write_recipe(data={"source": str(folder), "options": {}, "eval": {"fraction": 0.0}}))
    with pytest.raises(UserError, match="needs a 'chosen' column"):
        load_splits(recipe)


def test_missing_split_is_a_user_error(write_recipe, tmp_path):
    from posttrain.errors import UserError

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    recipe = load_recipe(write_recipe(data={"source": str(folder), "options": {}, "eval": {"split": "validation"}}))
    with pytest.raises(UserError, match="cannot load dataset"):
        load_splits(recipe)


def test_empty_heldout_split_is_refused(cli, write_recipe, tmp_path):
    train_file, eval_file = tmp_path / "t.jsonl", tmp_path / "e.jsonl"
    train_file.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    eval_file.write_text("")
    recipe = write_recipe(data={"source": str(train_file), "options": {}, "eval": {"source": str(eval_file)}})
    code, _, err = cli("validate", recipe)
    assert code == 2 and "data.eval.source" in err and "empty" in err
