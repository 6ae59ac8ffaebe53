"""Several datasets in one stage (open-instruct's dataset_mixer, open-r1's multi-source SFT): a list of sources,
each with its own split (and slice), subset, columns, format and share of rows, sampled with the recipe's seed;
each source checked on its own, the mix refused where its sources disagree; the rows each gives counted."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from posttrain.data import SplitSlice, load_splits, parse_split
from posttrain.errors import UserError
from posttrain.pipeline import load_recipe

NO_EVAL = {"fraction": 0.0}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _pairs(tag: str, n: int, prompt: str = "prompt") -> list[dict]:
    return [{prompt: f"{tag} question {i}", "chosen": f"{tag} good {i}", "rejected": f"{tag} bad {i}"}
            for i in range(n)]


def _mix(*entries, **extra) -> dict:
    return {"source": list(entries), "options": {}, "eval": NO_EVAL, **extra}


def _prompts(dataset) -> list[str]:
    return list(dataset["prompt"])


def test_a_two_source_mix_gives_the_rows_its_seed_draws(write_recipe, tmp_path):
    _jsonl(tmp_path / "a.jsonl", _pairs("a", 10))
    _jsonl(tmp_path / "b.jsonl", _pairs("b", 4, prompt="question"))
    recipe = write_recipe(seed=7, data=_mix({"source": "a.jsonl", "fraction": 0.5},  # relative to the recipe
                                            {"source": "b.jsonl", "count": 6, "columns": {"prompt": "question"}}))
    # the documented draw, computed here: source i samples with random.Random(seed + i), rows kept in order;
    # a count above the rows is every row once (whole copies), then a sample of the rest
    a_rows = sorted(random.Random(7 + 0).sample(range(10), 5))
    b_rows = list(range(4)) + sorted(random.Random(7 + 1).sample(range(4), 2))
    expected = [f"a question {i}" for i in a_rows] + [f"b question {i}" for i in b_rows]

    sources: list[dict] = []
    train, held, _ = load_splits(load_recipe(recipe), sources=sources)
    assert _prompts(train) == expected and held is None
    assert [(s["rows_read"], s["rows_used"]) for s in sources] == [(10, 5), (4, 6)]
    assert sources[0]["source"] == str((tmp_path / "a.jsonl").resolve())
    again, _, _ = load_splits(load_recipe(recipe))
    assert _prompts(again) == expected  # the same rows on a second load

    other, _, _ = load_splits(load_recipe(write_recipe(seed=8, data=_mix(
        {"source": "a.jsonl", "fraction": 0.5}, {"source": "b.jsonl", "count": 6, "columns": {"prompt": "question"}}))))
    assert _prompts(other)[:5] == [f"a question {i}" for i in sorted(random.Random(8).sample(range(10), 5))]


def test_slices_of_a_local_file(write_recipe, tmp_path):
    source = str(_jsonl(tmp_path / "p.jsonl", _pairs("p", 10)))
    train, _, _ = load_splits(load_recipe(write_recipe(data=_mix({"source": source, "split": "train[:50%]"},
                                                                 {"source": source, "split": "train[2:5]"}))))
    assert _prompts(train) == [f"p question {i}" for i in [0, 1, 2, 3, 4, 2, 3, 4]]
    # data.split takes a slice for a single source too
    single = {"source": source, "options": {}, "eval": NO_EVAL, "split": "train[-3:]"}
    train, _, _ = load_splits(load_recipe(write_recipe(data=single)))
    assert _prompts(train) == [f"p question {i}" for i in [7, 8, 9]]


@pytest.mark.parametrize("spec", ["train[:50%]", "train[:33%]", "train[10%:20%]", "train[-25%:]", "train[2:5]",
                                  "train[:1000]", "train[-3:]", "train[5%:]", "train[:-2]"])
@pytest.mark.parametrize("rows", [0, 3, 10, 37])
def test_slice_bounds_are_the_ones_datasets_reads(spec, rows):
    from datasets import ReadInstruction

    part = parse_split(spec, "data.split")
    (expected,) = ReadInstruction.from_spec(spec).to_absolute({"train": rows})
    assert isinstance(part, SplitSlice) and part.name == "train"
    assert part.bounds(rows) == (expected.from_, expected.to)


def test_a_slice_that_cannot_be_read_is_refused_naming_the_split(cli, write_recipe, tmp_path):
    source = str(_jsonl(tmp_path / "p.jsonl", _pairs("p", 4)))
    code, _, err = cli("validate", write_recipe(data=_mix({"source": source}, {"source": source, "split": "train[5]"})))
    assert code == 2 and "data.source[1].split" in err


def test_a_bad_row_in_the_second_source_is_refused_naming_it(cli, write_recipe, tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", _pairs("g", 4))
    bad_rows = _pairs("b", 4)
    bad_rows[2]["chosen"] = None
    bad = _jsonl(tmp_path / "bad.jsonl", bad_rows)
    recipe = write_recipe(data=_mix({"source": str(good)}, {"source": str(bad)}))
    code, _, err = cli("validate", recipe)
    assert code == 2 and "data.source[1] (row 3, chosen)" in err and "'chosen' is null" in err
    with pytest.raises(UserError) as e:  # and when the run loads it
        load_splits(load_recipe(recipe))
    assert e.value.field == "data.source[1] (row 3, chosen)"


def test_sources_that_disagree_are_refused(cli, write_recipe, tmp_path):
    pairs = _jsonl(tmp_path / "pairs.jsonl", _pairs("p", 4))
    chats = _jsonl(tmp_path / "chats.jsonl", [
        {"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": "y"}],
         "rejected": [{"role": "assistant", "content": "n"}]} for i in range(4)])
    code, _, err = cli("validate", write_recipe(data=_mix({"source": str(pairs)}, {"source": str(chats)})))
    assert code == 2 and "data.source[1]" in err and "either text or conversations" in err
    code, _, err = cli("validate", write_recipe(data=_mix({"source": str(pairs)},
                                                          {"source": str(pairs), "fraction": 0.5, "count": 2})))
    assert code == 2 and "data.source[1].count" in err
    code, _, err = cli("validate", write_recipe(data=_mix({"source": str(pairs)}, {"source": str(pairs),
                                                                                   "subset": "main"})))
    assert code == 2 and "data.source[1].subset" in err and "local source" in err
    code, _, err = cli("validate", write_recipe(data=_mix({"source": "stages.sft"})))
    assert code == 2 and "data.source[0].source" in err and "has no stages" in err


@pytest.mark.parametrize("key, value", [("split", "test"), ("columns", {"prompt": "question"}),
                                        ("format", "hh"), ("options", {"n": 8}), ("subset", "main")])
def test_data_level_keys_with_a_list_of_sources_are_refused(cli, write_recipe, tmp_path, key, value):
    source = str(_jsonl(tmp_path / "p.jsonl", _pairs("p", 4)))
    code, _, err = cli("validate", write_recipe(data=_mix({"source": source}, **{key: value})))
    assert code == 2 and f"data.{key}" in err and "each entry" in err


def test_eval_split_without_eval_source_is_refused_with_a_list(cli, write_recipe, tmp_path):
    source = str(_jsonl(tmp_path / "p.jsonl", _pairs("p", 4)))
    code, _, err = cli("validate", write_recipe(data=_mix({"source": source}, eval={"split": "test"})))
    assert code == 2 and "data.eval.split" in err and "data.eval.source" in err


def test_validate_lists_the_sources_and_held_out_rows_come_from_the_mix(cli, write_recipe, tmp_path):
    source = str(_jsonl(tmp_path / "p.jsonl", _pairs("p", 10)))
    recipe = write_recipe(data=_mix({"source": source, "split": "train[:4]"}, {"source": source, "count": 6},
                                    eval={"fraction": 0.25}))
    code, out, err = cli("validate", recipe)
    assert code == 0, err
    assert "2 sources" in out and "data.source[0]: " + source + " (split train[:4])" in out
    assert "data.source[1]: " + source + " (split train, count 6)" in out
    train, held, _ = load_splits(load_recipe(recipe))
    assert (len(train), len(held)) == (7, 3)  # 25% of the 10 mixed rows held out


def test_summary_json_counts_each_source(cli, write_recipe, tmp_path):
    _jsonl(tmp_path / "pairs.jsonl", _pairs("p", 12))
    data = _mix({"source": "pairs.jsonl", "split": "train[:50%]"},
                {"source": "builtin:arithmetic", "options": {"n": 16, "conversational": False}, "fraction": 0.5},
                eval={"fraction": 0.25})
    recipe = write_recipe(data=data, training={"max_steps": 1, "per_device_train_batch_size": 4,
                                               "per_device_eval_batch_size": 4, "logging_steps": 1},
                          eval={"generate": 0, "before": False})
    code, out, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_sources"] == [
        {"source": str((tmp_path / "pairs.jsonl").resolve()), "split": "train[:50%]", "subset": None,
         "rows_read": 12 // 2, "rows_used": 6},
        {"source": "builtin:arithmetic", "split": "train", "subset": None, "rows_read": 16, "rows_used": 8}]
    assert out.count("posttrain: data source ") == 2 and "builtin:arithmetic (split train): 8 rows used of 16" in out
    assert summary["heldout_examples"] == round(0.25 * 14)


def _hub_folder(root: Path) -> Path:
    """A dataset folder laid out as a hub dataset repository with two configurations (subsets), defined in its
    README.md's YAML header, read by datasets.load_dataset without the network."""
    for config in ("main", "socratic"):
        (root / config).mkdir(parents=True)
        _jsonl(root / config / "train.jsonl", [{"question": f"{config} q{i}", "answer": f"a{i}"} for i in range(6)])
    (root / "README.md").write_text("---\nconfigs:\n"
                                    "- config_name: main\n  data_files:\n  - split: train\n    path: main/train.jsonl\n"
                                    "- config_name: socratic\n  data_files:\n  - split: train\n"
                                    "    path: socratic/train.jsonl\n---\n# two subsets\n", encoding="utf-8")
    return root


def test_a_hub_style_source_with_a_subset_and_a_slice(write_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = _hub_folder(tmp_path / "gsm")
    columns = {"prompt": "question", "completion": "answer"}
    sources: list[dict] = []
    recipe = load_recipe(write_recipe(stage="sft", plugins={}, data=_mix(
        {"source": str(folder), "subset": "socratic", "split": "train[1:3]", "columns": columns},
        {"source": str(folder), "subset": "main", "split": "train[:50%]", "columns": columns})))
    train, _, _ = load_splits(recipe, sources=sources)
    assert _prompts(train) == ["socratic q1", "socratic q2", "main q0", "main q1", "main q2"]
    assert [(s["subset"], s["rows_read"], s["rows_used"]) for s in sources] == [("socratic", 2, 2), ("main", 3, 3)]


def test_a_list_of_sources_round_trips_and_its_stage_references_resolve(write_recipe, tmp_path):
    import yaml
    from posttrain import stage_refs
    from posttrain.pipeline import recipe_from_data

    source = str(_jsonl(tmp_path / "p.jsonl", _pairs("p", 4)))
    recipe = load_recipe(write_recipe(data=_mix(source, {"source": source, "split": "train[:2]", "count": 3})))
    assert recipe.data.source[0].source == source and recipe.data.source[0].split == "train"  # a string entry
    data = yaml.safe_load(yaml.safe_dump(recipe.to_dict()))  # as recipe.yaml keeps it
    assert recipe_from_data(data).to_dict() == recipe.to_dict()
    stage_refs.publish("rs", dataset=tmp_path / "samples.jsonl")
    try:
        data["data"]["source"][1]["source"] = "stages.rs"
        resolved = stage_refs.resolved(data)
    finally:
        stage_refs.clear()
    assert resolved["data"]["source"][1]["source"] == str((tmp_path / "samples.jsonl").resolve())


def test_the_max_length_check_reads_each_source_of_a_mix(cli, write_recipe, tmp_path):
    long = "a long question that goes on " * 6
    short = _jsonl(tmp_path / "short.jsonl", [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(6)])
    some = _jsonl(tmp_path / "some.jsonl", [{"prompt": long if i < 2 else f"q{i}", "chosen": "yes", "rejected": "no"}
                                            for i in range(8)])
    every = _jsonl(tmp_path / "every.jsonl", [{"prompt": long, "chosen": "yes", "rejected": "no"} for _ in range(5)])
    code, out, err = cli("validate", write_recipe(data=_mix({"source": str(short)}, {"source": str(some)}),
                                                  training={"max_length": 24}))
    assert code == 0, err
    assert f"{some}: 2 of 8 rows would be dropped at training.max_length = 24" in out
    code, _, err = cli("validate", write_recipe(data=_mix({"source": str(short)}, {"source": str(every)}),
                                                training={"max_length": 24}))
    assert code == 2 and "training.max_length" in err and f"every one of the 5 rows of {every}" in err
