"""docs/results.md is made from the records in docs/results/ by bench/results.py: the committed page is
what `render` writes (so no number on it can drift from its record), `add` makes a record from what a
run wrote, and a malformed record is refused naming the file and the field."""

from __future__ import annotations

import datetime
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "results.py"


def load_results():
    spec = importlib.util.spec_from_file_location("posttrain_bench_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metrics_of(record: dict) -> dict:
    return {m["name"]: m["value"] for m in record["metrics"]}


def test_the_committed_page_is_what_render_writes():
    results = load_results()
    page = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    assert results.render_text(REPO / "docs" / "results") == page, \
        "docs/results.md differs from its records: run `make results` (python bench/results.py render)"
    records = results.load_records(REPO / "docs" / "results")
    assert {r["group"] for _, r in records} == set(results.GROUPS)  # every subject has a table
    for _, record in records:  # every record's numbers are on the page
        assert f"| {results.cell(record['name'])} |" in page


def test_add_records_a_runs_summary_with_its_own_numbers(tmp_path):
    results = load_results()
    run = tmp_path / "runs" / "my-run"
    run.mkdir(parents=True)
    summary = {
        "recipe": "my-dpo", "stage": "preference", "global_step": 12, "train_seconds_this_session": 81.4,
        "heldout_examples": 24,
        "before": {"heldout": {"loss": 0.6931, "preference_accuracy": 0.5, "logp_accuracy": 0.625},
                   "answers": {"n": 24, "answer_accuracy": 0.125, "mean_reward": 0.125,
                               "by_source": {"verify_gsm8k": 0.125}, "examples": [{"prompt": "p"}]}},
        "after": {"heldout": {"loss": 0.4012, "preference_accuracy": 0.875, "logp_accuracy": 0.6667},
                  "answers": {"n": 24, "answer_accuracy": 0.2083, "mean_reward": 0.2083,
                              "by_source": {"verify_gsm8k": 0.2083}, "examples": []}},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    records = tmp_path / "records"
    assert results.main(["add", str(run), "--records", str(records), "--command", "posttrain run my-dpo",
                         "--machine", "a test machine"]) == 0

    [path] = list(records.glob("*.json"))
    record = json.loads(path.read_text())
    written = json.loads((run / "summary.json").read_text())
    got = metrics_of(record)
    assert got["steps"] == written["global_step"]
    assert got["held-out examples"] == written["heldout_examples"]
    for key in written["before"]["heldout"]:
        assert got[f"held-out {key.replace('_', ' ')}"] == [written["before"]["heldout"][key],
                                                           written["after"]["heldout"][key]]
    for key in ("answer_accuracy", "mean_reward"):
        assert got[f"greedy {key.replace('_', ' ')}"] == [written["before"]["answers"][key],
                                                         written["after"]["answers"][key]]
    assert got["training time (s)"] == written["train_seconds_this_session"]
    assert "greedy n" not in got and "greedy examples" not in got  # counts and samples are not results
    assert record["name"] == written["recipe"] and record["group"] == "quick-start"
    assert record["command"] == "posttrain run my-dpo" and record["machine"] == "a test machine"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert record["commit"] == head.stdout.strip()
    mtime = (run / "summary.json").stat().st_mtime
    assert record["date"] == datetime.date.fromtimestamp(mtime).isoformat()
    assert "summary.json" in record["source"]
    # the page shows the record's own numbers, before -> after
    assert results.main(["render", "--records", str(records), "--out", str(tmp_path / "page.md")]) == 0
    page = (tmp_path / "page.md").read_text()
    before, after = written["before"]["heldout"]["preference_accuracy"], written["after"]["heldout"]["preference_accuracy"]
    assert f"| held-out preference accuracy | {before:.3f} → {after:.3f} |" in page
    # the same run twice is refused, not recorded twice
    assert results.main(["add", str(run), "--records", str(records)]) == 2
    assert len(list(records.glob("*.json"))) == 1


def test_add_records_a_benchmark_report(tmp_path):
    results = load_results()
    report = {"model_parameters": 19_700_000, "steps": 20, "lora": False, "repeats": 2,
              "trl_median_step_s": 0.5123, "posttrain_median_step_s": 0.4987, "step_time_ratio": 0.9735,
              "trl_rewards": [0.1, 0.2], "posttrain_rewards": [0.1, 0.2], "max_abs_reward_difference": 0.0,
              "max_abs_loss_difference": 9e-7, "torch_threads": 2}
    (tmp_path / "online.json").write_text(json.dumps(report))
    assert results.main(["add", str(tmp_path / "online.json"), "--records", str(tmp_path / "records")]) == 0
    [path] = list((tmp_path / "records").glob("*.json"))
    record = json.loads(path.read_text())
    got = metrics_of(record)
    assert record["group"] == "bench-trl" and record["name"] == "bench/online.py"
    assert got["step-time ratio (posttrain / TRL)"] == report["step_time_ratio"]
    assert got["largest loss difference"] == report["max_abs_loss_difference"]
    assert record["command"] == "python bench/online.py --steps 20 --repeats 2"
    assert record["machine"] == results.this_machine()


def test_a_record_missing_a_field_is_refused(tmp_path, capsys):
    results = load_results()
    records = tmp_path / "records"
    records.mkdir()
    good = {"group": "quick-start", "name": "quickstart", "metrics": [{"name": "steps", "value": 40}],
            "machine": "2 CPU cores", "commit": "abc1234", "command": "make demo", "date": "2026-12-07",
            "source": "a test"}
    (records / "good.json").write_text(json.dumps(good))
    broken = {k: v for k, v in good.items() if k != "machine"}
    (records / "broken.json").write_text(json.dumps(broken))
    out = tmp_path / "page.md"
    assert results.main(["render", "--records", str(records), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and "missing field 'machine'" in err and "every record needs" in err
    assert not out.exists()
    # other mistakes name the field too
    for change, message in (({"group": "nonsense"}, "group 'nonsense' is not one of"),
                            ({"metrics": [{"name": "steps"}]}, "metrics[0]"),
                            ({"date": "7 Dec"}, "is not YYYY-MM-DD"),
                            ({"colour": "red"}, "unknown field 'colour'")):
        (records / "broken.json").write_text(json.dumps({**good, **change}))
        assert results.main(["render", "--records", str(records), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err


def test_the_script_imports_no_torch():
    code = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('r', {str(SCRIPT)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "assert 'torch' not in sys.modules and 'posttrain' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
