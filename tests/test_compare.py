"""`posttrain compare`: a table and a PNG with one line per run, from real run directories."""

import json

import pytest


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, tiny_model_dir):
    from posttrain.testing import run_recipe

    base = tmp_path_factory.mktemp("runs")
    plugins = {"dpo": {"dpo": {"beta": 0.5}}, "dpo_norm": {"dpo_norm": {"beta": 2.0}},
               "simpo": {"simpo": {"beta": 2.0}}}
    model = {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "alpha": 16}}
    for name, p in plugins.items():
        run_recipe({"model": model, "plugins": p}, steps=3, output_dir=base / name)
    return [base / name for name in plugins]


def test_compare_writes_a_png_with_one_line_per_run(cli, three_runs, tmp_path):
    from posttrain.compare import figure, load_run

    out = tmp_path / "cmp.png"
    code, stdout, err = cli("compare", *three_runs, "--output", out)
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    for name in ("dpo (dpo)", "dpo_norm (dpo_norm)", "simpo (simpo)"):
        assert name in stdout
    assert "pref acc after" in stdout
    fig = figure([load_run(p) for p in three_runs])
    loss_ax, margin_ax, logps_ax, heldout_ax = fig.axes
    assert len(loss_ax.get_lines()) == 3 and len(margin_ax.get_lines()) == 3
    assert len(logps_ax.get_lines()) == 6  # chosen and rejected per run
    assert len(heldout_ax.get_lines()) == 3
    ys = loss_ax.get_lines()[0].get_ydata()
    losses = [m["loss"] for m in map(json.loads, (three_runs[0] / "metrics.jsonl").read_text().splitlines())
              if "loss" in m]
    assert list(ys) == pytest.approx(losses)


def test_compare_errors(cli, three_runs, tmp_path):
    code, _, err = cli("compare", tmp_path / "nothing", "--output", tmp_path / "x.png")
    assert code == 2 and "not a run directory" in err
    existing = tmp_path / "old.png"
    existing.write_bytes(b"keep")
    code, _, err = cli("compare", *three_runs, "--output", existing)
    assert code == 2 and "already exists" in err and existing.read_bytes() == b"keep"
