"""Shared test fixtures: a tiny random Llama with a BPE tokenizer trained here (posttrain.testing),
recipes, and a third-party plugin distribution built on disk (its own dist-info and entry points)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import json  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402
from posttrain import registry  # noqa: E402
from posttrain.testing import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
THIRD_PARTY = Path(__file__).resolve().parent / "thirdparty"

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def write_recipe(tmp_path, tiny_model_dir):
    """Write a small CPU recipe for the tiny model; keyword arguments deep-merge into it (an empty
    mapping replaces the section, None sets the key to null, `plugins` is always replaced whole)."""

    def write(name: str = "recipe", **overrides) -> Path:
        data = {
            "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "data": {"source": "builtin:arithmetic", "options": {"n": 96}, "eval": {"fraction": 0.25}},
            "plugins": {"dpo": {"beta": 0.1}},
            "training": {"learning_rate": 5e-3, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
                         "max_steps": 6, "logging_steps": 2, "save_steps": 100, "max_length": 64},
            "eval": {"generate": 8, "max_new_tokens": 8},
        }
        plugins = overrides.pop("plugins", None)
        _merge(data, overrides)
        if plugins is not None:  # the plugin list is given whole: its order is the hook call order
            data["plugins"] = plugins
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


GROUP_PLUS_NORM = {"group_relative": {}, "advantage_norm": {"scope": "group"}}  # GRPO's advantages


@pytest.fixture
def online_recipe(tmp_path, tiny_model_dir):
    """Write a small online recipe for the tiny model; keyword arguments deep-merge into it (an empty
    mapping replaces the section, None sets the key to null, `plugins` is replaced whole)."""

    def write(name="online", plugins=None, **overrides):
        data = {
            "stage": "online",
            "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "data": {"source": "builtin:word_problems", "options": {"n": 64}, "eval": {"fraction": 0.25}},
            "plugins": plugins if plugins is not None else {"online_plugins:DigitShare": {}, **GROUP_PLUS_NORM},
            "training": {"learning_rate": 5e-3, "per_device_train_batch_size": 8, "num_generations": 4,
                         "max_completion_length": 12, "max_steps": 3, "logging_steps": 1, "save_strategy": "no"},
            "eval": {"generate": 4, "max_new_tokens": 6},
        }
        _merge(data, overrides)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and value and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from posttrain.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def make_distribution(site: Path, name: str, version: str, module_source: str, entry_points: dict[str, str]) -> Path:
    """Lay out an installed distribution (module + dist-info with entry points) under ``site``."""
    module = name.replace("-", "_")
    (site / module).mkdir(parents=True, exist_ok=True)
    (site / module / "__init__.py").write_text(textwrap.dedent(module_source))
    info = site / f"{module}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[posttrain.plugins]\n{lines}\n")
    return site


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """The test-only plugin package `acme-posttrain` (tests/thirdparty/acme.py), visible to
    importlib.metadata in this process and in subprocesses (via PYTHONPATH)."""
    site = tmp_path / "site"
    make_distribution(site, "acme-posttrain", "0.3.0", (THIRD_PARTY / "acme.py").read_text(), {
        "acme_metrics": "acme_posttrain:AcmeMetrics",
        "acme_loss": "acme_posttrain:AcmeLoss",
        "acme_explode": "acme_posttrain:AcmeExplode",
        "acme_killer": "acme_posttrain:AcmeKiller",
        "acme_broken": "acme_posttrain.missing:Nothing",
        "acme_misnamed": "acme_posttrain:AcmeMisnamedHook",
        "acme_hooks": "acme_posttrain:AcmeHooks",
        "acme_unmarked": "acme_posttrain:AcmeUnmarked",
    })
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    registry.clear_cache()
    yield site
    sys.modules.pop("acme_posttrain", None)
    registry.clear_cache()


@pytest.fixture(autouse=True)
def _fresh_registry():
    registry.clear_cache()
    yield
    registry.clear_cache()


def free_port() -> str:
    """A free loopback port for a multi-process launch's rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def cpu_processes_env(**extra) -> dict:
    """Environment for a multi-process launch in a test: CPU processes over gloo whatever GPUs the
    machine has (a one-GPU machine cannot give each of two processes its own device)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", **extra}


def device_batch(trainer, n: int = 4) -> dict:
    """A collated batch of the trainer's first ``n`` training examples, on the trainer's device."""
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
