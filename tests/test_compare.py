"""`posttrain compare`: every stage drawn with its own panels (from matplotlib's objects, not pixels),
a pipeline's stages and an iterative stage's rounds one after another on the step axis, the table's
numbers equal to the runs' summaries, --metrics, and the .html and .csv outputs."""

import csv
import io
import json

import pytest
import yaml

pytestmark = pytest.mark.slow  # every test draws runs trained in the module's fixture

WORDS = {"source": "builtin:word_problems", "options": {"n": 24}, "eval": {"fraction": 0.2}}
KINDS = {
    "preference": {"plugins": {"dpo": {"beta": 0.5}, "verify_gsm8k": {}}},
    "sft": {"stage": "sft", "plugins": {"verify_gsm8k": {}},
            "data": {"source": "builtin:arithmetic", "options": {"n": 48}, "columns": {"completion": "chosen"},
                     "eval": {"fraction": 0.25}}},
    "reward_model": {"stage": "reward_model", "plugins": {}},
    "online": {"stage": "online", "data": WORDS, "training": {"beta": 0.05, "num_generations": 4},
               "plugins": {"online_plugins:DigitShare": {}, "critic": {}, "gae": {}}},
    "iterative": {"stage": "iterative", "data": WORDS, "training": {"max_length": 512}, "rounds": 2,
                  "plugins": {"dpo": {}, "online_plugins:DigitShare": {}},
                  "sampling": {"samples": 3, "prompts": 4, "max_new_tokens": 6}},
    "rejection_sampling": {"stage": "rejection_sampling", "data": {**WORDS, "eval": {"fraction": 0.0}},
                           "plugins": {"online_plugins:DigitShare": {}},
                           "sampling": {"samples": 2, "prompts": 4, "max_new_tokens": 4}},
    "kto": {"stage": "kto", "plugins": {"verify_gsm8k": {}}},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """One short real run of each stage kind on the tiny model, and a two-stage pipeline."""
    from posttrain.runner import run

    base = tmp_path_factory.mktemp("runs")
    out = {}
    for kind, extra in KINDS.items():
        recipe = {"model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
                  "data": {"source": "builtin:arithmetic", "options": {"n": 48}, "eval": {"fraction": 0.25}},
                  "eval": {"generate": 2, "max_new_tokens": 4}, **extra}
        if kind == "rejection_sampling":
            recipe["model"].pop("lora")
            recipe["eval"] = {"generate": 0}
        else:
            recipe["training"] = {"per_device_train_batch_size": 4, "max_steps": 3, "logging_steps": 1,
                                  "save_strategy": "no", **({} if kind == "online" else {"max_length": 64}),
                                  **extra.get("training", {})}
        path = base / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        run(str(path), [], str(base / kind))
        out[kind] = base / kind
    pipeline = {"name": "p", "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "alpha": 16}},
                "stages": [{"name": "sft", **KINDS["sft"], "training": {"max_steps": 2, "logging_steps": 1,
                                                                        "per_device_train_batch_size": 4,
                                                                        "save_strategy": "no", "max_length": 64},
                            "eval": {"generate": 2, "max_new_tokens": 4}},
                           {"name": "dpo", "stage": "preference", **KINDS["preference"],
                            "data": {"source": "builtin:arithmetic", "options": {"n": 48}, "eval": {"fraction": 0.25}},
                            "training": {"max_steps": 3, "logging_steps": 1, "per_device_train_batch_size": 4,
                                         "save_strategy": "no", "max_length": 64},
                            "eval": {"generate": 2, "max_new_tokens": 4}}]}
    path = base / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    run(str(path), [], str(base / "pipeline"))
    out["pipeline"] = base / "pipeline"
    return out


def _titles(fig):
    return [ax.get_title() for ax in fig.axes]


def test_each_stage_is_drawn_with_its_own_panels(runs):
    from posttrain.compare import figure, load_runs

    loaded = [r for i, kind in enumerate(KINDS) for r in load_runs(runs[kind], group=i)]
    titles = _titles(figure(loaded))
    expected = [
        "preference: training loss", "preference: held-out preference accuracy",
        "sft: training loss (completion NLL)", "sft: held-out completion NLL",
        "reward_model: pairwise accuracy (training)", "reward_model: held-out pairwise accuracy",
        "online: mean training reward (all sources, weighted)", "online: training reward: digit_share",
        "online: critic: value loss", "online: critic: explained variance of the returns (1 = perfect)",
        "online: completion length (tokens)",
        "iterative: mean reward of the round's samples", "iterative: pairs kept per round",
        "iterative: greedy answer accuracy after each round (held out)",
        "rejection_sampling: prompts kept (best sample at least min_score)",
        "kto: training loss (KTO)", "kto: KL estimate z0",
    ]
    missing = [t for t in expected if t not in titles]
    assert not missing, (missing, titles)
    # no panel mixes stage kinds (their scales differ): each axis's title names one kind
    assert all(t.split(":")[0] in KINDS for t in titles)


def test_series_are_the_logged_numbers_on_one_step_axis(runs):
    from posttrain.compare import figure, load_runs

    fig = figure(load_runs(runs["online"]))
    ax = next(a for a in fig.axes if a.get_title() == "online: critic: value loss")
    logged = [json.loads(x) for x in (runs["online"] / "metrics.jsonl").read_text().splitlines()]
    assert list(ax.get_lines()[0].get_ydata()) == pytest.approx([m["critic/value_loss"] for m in logged
                                                                 if "critic/value_loss" in m])
    # an iterative stage: round 2's steps follow round 1's, with the boundary drawn
    iterative = load_runs(runs["iterative"])
    fig = figure(iterative)
    ax = next(a for a in fig.axes if a.get_title().startswith("iterative: training loss"))
    xs = list(ax.get_lines()[0].get_xdata())
    assert xs == sorted(xs) and xs[-1] == iterative[0].steps == 6
    assert any(line.get_linestyle() == ":" for line in ax.get_lines())  # the round boundary
    # a pipeline: the dpo stage's curve starts where the sft stage's ends
    stages = load_runs(runs["pipeline"])
    assert [s.kind for s in stages] == ["sft", "preference"] and stages[1].offset == stages[0].steps == 2
    fig = figure(stages)
    ax = next(a for a in fig.axes if a.get_title() == "preference: training loss")
    assert list(ax.get_lines()[0].get_xdata()) == [3, 4, 5]


def test_the_table_has_the_summaries_numbers(runs, cli, tmp_path):
    from posttrain.compare import load_runs, rows

    loaded = [r for i, kind in enumerate(KINDS) for r in load_runs(runs[kind], group=i)]
    table = {(r["run"], r["metric"]): (r["before"], r["after"]) for r in rows(loaded)}
    for kind in KINDS:
        summary = json.loads((runs[kind] / "summary.json").read_text())
        for group in ("heldout", "answers"):
            for key, value in ((summary.get("after") or {}).get(group) or {}).items():
                if isinstance(value, (int, float)):
                    label = f"{'held-out' if group == 'heldout' else 'answers'} {key}"
                    assert table[(kind, label)][1] == value, (kind, label)
                if key == "by_source":  # each reward source's mean over the greedy answers
                    for source, mean in value.items():
                        assert table[(kind, f"answers {source} (mean reward)")][1] == mean, (kind, source)
    assert table[("reward_model", "held-out pairwise_accuracy")][0] is not None
    it = json.loads((runs["iterative"] / "summary.json").read_text())
    assert table[("iterative", "round 2 pairs")] == (None, it["rounds"][1]["pairs"])
    rs = json.loads((runs["rejection_sampling"] / "summary.json").read_text())
    assert table[("rejection_sampling", "prompts kept")] == (None, rs["kept"])
    online = json.loads((runs["online"] / "summary.json").read_text())
    assert table[("online", "training reward (first -> last third)")] == (online["reward_first_third"],
                                                                          online["reward_last_third"])
    code, out, err = cli("compare", *(runs[k] for k in KINDS), runs["pipeline"], "--output", tmp_path / "all.png")
    assert code == 0, err
    assert (tmp_path / "all.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out pairwise_accuracy" in out and "round 2 answer accuracy" in out


def test_metrics_html_csv_and_errors(runs, cli, tmp_path):
    from posttrain.compare import figure, load_runs

    loaded = load_runs(runs["online"])
    assert _titles(figure(loaded, ["reward", "value_loss"])) == [
        "online: mean training reward (all sources, weighted)", "online: critic: value loss"]
    code, _, err = cli("compare", runs["online"], "--metrics", "nope", "--output", tmp_path / "x.png")
    assert code == 2 and "--metrics" in err and "online/reward" in err
    code, _, err = cli("compare", runs["preference"], runs["kto"], "--output", tmp_path / "t.csv")
    assert code == 0, err
    table = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    assert {r["run"] for r in table} == {"preference", "kto"} and all("metric" in r for r in table)
    code, _, err = cli("compare", runs["preference"], "--output", tmp_path / "c.html")
    assert code == 0 and "data:image/png;base64," in (tmp_path / "c.html").read_text()
    code, _, err = cli("compare", tmp_path / "nothing", "--output", tmp_path / "y.png")
    assert code == 2 and "not a run directory" in err
    existing = tmp_path / "old.png"
    existing.write_bytes(b"keep")
    code, _, err = cli("compare", runs["preference"], "--output", existing)
    assert code == 2 and "already exists" in err and existing.read_bytes() == b"keep"
    code, _, err = cli("compare", runs["preference"], "--output", tmp_path / "x.pdf")
    assert code == 2 and ".png, .html or .csv" in err
