"""posttrain as a pip user gets it: the wheel built from this tree carries the shipped recipes (and their
DeepSpeed configs), installs into a fresh environment, and from another folder lists, shows, writes out,
validates and runs a shipped recipe; a recipe's relative paths are read against its own folder."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO

pytestmark = pytest.mark.slow  # builds and installs the wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtual environment with the wheel installed; the suite's own packages (torch, TRL...) are
    visible to it through a .pth line, but not the suite's editable posttrain."""
    base = tmp_path_factory.mktemp("pip-user")
    dist = base / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                            "-w", str(dist)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "as a TOML table is deprecated" not in build.stdout + build.stderr  # the license metadata
    wheel = next(dist.glob("posttrain-*.whl"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "suite-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return wheel, python, elsewhere


def _posttrain(installed, *args):
    _, python, elsewhere = installed
    return subprocess.run([str(python), "-m", "posttrain", *map(str, args)], capture_output=True, text=True,
                          cwd=elsewhere, timeout=900, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_the_wheel_carries_the_recipes(installed):
    wheel, python, elsewhere = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "posttrain/recipes/quickstart.yaml" in names and "posttrain/recipes/deepspeed/zero3.json" in names
    assert "posttrain/stages/kto.py" in names and "posttrain/trainers/online.py" in names
    where = subprocess.run([str(python), "-c", "import posttrain; print(posttrain.__file__)"], capture_output=True,
                           text=True, cwd=elsewhere).stdout
    assert str(REPO) not in where and "site-packages" in where  # the installed copy, not this tree


def test_a_pip_user_lists_shows_validates_and_writes_out_recipes(installed):
    _, _, elsewhere = installed
    listed = _posttrain(installed, "recipes")
    assert listed.returncode == 0 and "quickstart" in listed.stdout and "tulu3-8b-pipeline" in listed.stdout
    shown = _posttrain(installed, "recipes", "--show", "quickstart")
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout)["plugins"]["dpo"] == {"beta": 0.1}
    assert _posttrain(installed, "validate", "quickstart").returncode == 0
    checked = _posttrain(installed, "validate", "tulu3-dpo-norm-8b")  # names deepspeed/zero3.json beside itself
    assert checked.returncode == 0, checked.stderr
    written = _posttrain(installed, "init", "tulu3-dpo-norm-8b", "mine.yaml")
    assert written.returncode == 0, written.stderr
    assert (elsewhere / "mine.yaml").is_file() and (elsewhere / "deepspeed" / "zero3.json").is_file()
    assert _posttrain(installed, "validate", "mine.yaml").returncode == 0
    assert _posttrain(installed, "init", "quickstart", "mine.yaml").returncode == 2  # nothing overwritten
    assert _posttrain(installed, "--version").stdout.startswith("posttrain")


def test_a_pip_user_runs_a_shipped_recipe(installed, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    done = _posttrain(installed, "run", "rpo-cpu", "--output-dir", run, "--set", f"model.name_or_path={tiny_model_dir}",
                      "--set", "training.max_steps=2", "--set", "eval.generate=2", "--set", "data.options.n=48")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "summary.json").is_file() and (run / "final" / "adapter_config.json").is_file()


def test_relative_paths_are_read_against_the_recipes_folder(cli, tmp_path, tiny_model_dir):
    import json

    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    rows = [{"prompt": f"Q{i}", "chosen": " yes", "rejected": " no"} for i in range(16)]
    (folder / "data" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu":
                                                "auto"}))
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)},
                                      "data": {"source": "data/pairs.jsonl"}, "training": {"deepspeed": "ds.json"}}))
    code, out, err = cli("validate", recipe)  # run from another folder: the paths are the recipe's
    assert code == 0, err
    assert str(folder / "data" / "pairs.jsonl") in out and f"deepspeed={folder / 'ds.json'}" in out
