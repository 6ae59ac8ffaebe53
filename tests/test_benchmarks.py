"""Standard benchmarks through lm-evaluation-harness: a recipe's eval.lm_eval before and after a run, and
`posttrain eval` on a run directory, on a local task (offline); the numbers are lm-eval's own for the same
model (checked by running lm-eval directly), `posttrain compare` shows them, and mistakes get exit 2."""

import json

import pytest
import yaml

pytestmark = pytest.mark.slow  # lm-eval benchmarks around runs


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """A multiple-choice arithmetic task in lm-eval's YAML format, reading a local JSONL file."""
    import random

    folder = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    rows = []
    for _ in range(16):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        rows.append({"question": f"What is {a} + {b}?", "choices": [f" {a + b}", f" {a + b + 1}"], "label": 0})
    (folder / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "arith_mc.yaml").write_text(yaml.safe_dump({
        "task": "arith_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": str(folder / "arith.jsonl")},
        "test_split": "train", "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}, sort_keys=False))
    return folder


def _direct(model_args: dict, task_dir, limit=10) -> dict:
    """lm-eval itself, on the same model, task and limit."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args={**model_args, "dtype": "float32"}, tasks=["arith_mc"],
                                  limit=limit, batch_size=8, device="cpu", log_samples=False,
                                  task_manager=TaskManager(include_path=str(task_dir)))
    return out["results"]["arith_mc"]


def test_a_recipe_benchmarks_the_start_and_the_output_and_eval_reruns_it(cli, write_recipe, tmp_path, tiny_model_dir,
                                                                          local_task):
    """eval.lm_eval in a recipe scores the start and the trained model; `posttrain eval` on the run directory
    scores its final model again; both are lm-eval's own numbers, and `posttrain compare` shows them."""
    recipe = write_recipe(model={"dtype": "float32"}, training={"max_steps": 3},
                          eval={"lm_eval": {"tasks": ["arith_mc"], "limit": 10, "include_path": str(local_task)}})
    run = tmp_path / "run"
    code, out, err = cli("run", recipe, "--output-dir", run)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    before = summary["lm_eval"]["before"]["results"]["arith_mc"]
    after = summary["lm_eval"]["after"]["results"]["arith_mc"]
    assert json.loads((run / "eval.json").read_text())["results"]["arith_mc"] == after
    assert summary["lm_eval"]["after"]["peft"] == str(run / "final")  # the LoRA adapter on its base
    assert before["acc,none"] == pytest.approx(_direct({"pretrained": str(tiny_model_dir)}, local_task)["acc,none"])
    direct = _direct({"pretrained": str(tiny_model_dir), "peft": str(run / "final")}, local_task)
    assert after["acc,none"] == pytest.approx(direct["acc,none"]) and after["sample_len"] == 10
    assert "lm-eval arith_mc/acc" in out

    (run / "eval.json").unlink()
    code, out, err = cli("eval", run, "--tasks", "arith_mc", "--include-path", local_task, "--limit", "10")
    assert code == 0, err
    record = json.loads((run / "eval.json").read_text())
    assert record["results"]["arith_mc"]["acc,none"] == pytest.approx(direct["acc,none"])
    assert "arith_mc" in out and "acc,none" in out
    code, out, _ = cli("compare", run, "--output", tmp_path / "cmp.png")
    assert code == 0 and "lm-eval arith_mc/acc" in out


def test_benchmark_mistakes_are_user_errors(cli, write_recipe, tmp_path, local_task):
    code, _, err = cli("eval", tmp_path, "--tasks", "arith_mc")
    assert code == 2 and "neither a model folder nor a run directory" in err
    recipe = write_recipe(eval={"lm_eval": {"tasks": ["arith_mcc"], "include_path": str(local_task)}})
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 2 and "eval.lm_eval.tasks" in err and "did you mean 'arith_mc'" in err
    assert not (tmp_path / "run").exists()  # nothing left to block the corrected run
