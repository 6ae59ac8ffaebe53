"""What a run hands to services outside it, checked before anything loads and kept working offline: the
trackers of `training.report_to` (TensorBoard event files in the run directory; W&B offline), the
upload of `training.push_to_hub` (refused when the hub is off, and a failed upload after training
keeps the model), and evaluation during training (`eval_strategy`) needing held-out data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


# -- evaluation during training needs held-out data ------------------------------------------------


@pytest.mark.parametrize("training", [{"eval_strategy": "steps", "eval_steps": 2}, {"eval_on_start": True}])
def test_eval_strategy_without_heldout_data_is_refused(cli, online_recipe, write_recipe, training):
    for recipe in (online_recipe, write_recipe):
        code, _, err = cli("validate", recipe(data={"eval": {"fraction": 0.0}}, training=training))
        assert code == 2, err
        assert "data.eval" in err and "held-out" in err


def test_online_eval_strategy_needs_greedy_answers(cli, online_recipe):
    code, _, err = cli("validate", online_recipe(training={"eval_strategy": "steps", "eval_steps": 2},
                                                 eval={"generate": 0}))
    assert code == 2 and "eval.generate" in err, err


# -- trackers --------------------------------------------------------------------------------------


def test_report_to_a_tracker_that_is_not_installed_is_refused(cli, write_recipe, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    missing = {"tensorboard", "tensorboardX", "wandb", "clearml"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.split(".")[0] in missing else real(name, *a, **k))
    for report_to, install in ((["tensorboard"], "pip install 'posttrain[tensorboard]'"), ("wandb", "pip install wandb"),
                               (["clearml"], "pip install clearml")):
        code, _, err = cli("validate", write_recipe(training={"report_to": report_to}))
        assert code == 2, err
        assert "training.report_to" in err and install in err, err
    code, _, err = cli("validate", write_recipe(training={"report_to": ["tensorbord"]}))
    assert code == 2 and "did you mean 'tensorboard'" in err, err
    code, _, err = cli("validate", write_recipe(training={"report_to": ["none", "mlflow"]}))
    assert code == 2 and "training.report_to" in err and "stands alone" in err, err


@pytest.mark.slow
def test_report_to_tensorboard_writes_event_files_in_the_run_directory(cli, write_recipe, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (make setup installs it)")
    recipe = write_recipe(training={"max_steps": 2, "logging_steps": 1, "report_to": ["tensorboard"]},
                          eval={"generate": 0, "before": False})
    code, _, err = cli("validate", recipe)
    assert code == 0, err
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events, sorted(str(p) for p in (tmp_path / "run").rglob("*"))


def test_report_to_wandb_runs_offline_without_the_network(cli, write_recipe, tmp_path, monkeypatch):
    """With HF_HUB_OFFLINE=1 (or no WANDB_API_KEY) and WANDB_MODE unset, W&B runs offline: its run
    directory is written under the run directory, nothing is sent."""
    pytest.importorskip("wandb", reason="wandb is not installed (it is not in posttrain's default extras)")
    monkeypatch.delenv("WANDB_DISABLED", raising=False)  # conftest's guard, for every other test
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    import socket

    outside, connect = [], socket.socket.connect

    def loopback_only(sock, address):  # this process's connections (wandb's own service is another process)
        if sock.family != socket.AF_UNIX and address[0] not in ("127.0.0.1", "::1", "localhost"):
            outside.append(address)
            raise OSError("blocked by the test: only 127.0.0.1")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    recipe = write_recipe(training={"max_steps": 1, "logging_steps": 1, "report_to": ["wandb"]},
                          eval={"generate": 0, "before": False})
    code, out, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    assert "W&B runs offline" in out + err and not outside, outside
    assert list((tmp_path / "run").rglob("offline-run-*")), sorted(str(p) for p in (tmp_path / "run").rglob("*"))


# -- the hub ---------------------------------------------------------------------------------------


def test_push_to_hub_is_refused_while_the_hub_is_off(cli, write_recipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = cli("validate", write_recipe(training={"push_to_hub": True}))
    assert code == 2, err
    assert "training.push_to_hub" in err and "push_to_hub needs the hub; HF_HUB_OFFLINE is set" in err


# Loaded first by the run below (PYTHONPATH): any connection to an address other than the loopback fails
# and is recorded, so the test sees that nothing reached outside 127.0.0.1.
_NO_OUTSIDE = '''
import os, socket
_connect = socket.socket.connect
def _guarded(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and self.family != socket.AF_UNIX:
        with open(os.environ["OUTSIDE_LOG"], "a") as f:
            f.write(repr(address) + "\\n")
        raise OSError("blocked by the test: only 127.0.0.1")
    return _connect(self, address)
socket.socket.connect = _guarded
'''


@pytest.mark.slow
def test_a_failed_upload_after_training_keeps_the_model(write_recipe, tmp_path):
    """push_to_hub with the hub unreachable (a closed port on 127.0.0.1): training goes on, the model is
    kept in final/, the run ends with exit 0 and says the upload failed (summary.json too)."""
    from conftest import free_port

    site = tmp_path / "guard"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_NO_OUTSIDE)
    outside = tmp_path / "outside.log"
    recipe = write_recipe(training={"max_steps": 1, "logging_steps": 1, "push_to_hub": True,
                                    "hub_model_id": "someone/tiny"},
                          eval={"generate": 0, "before": False})
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_TOKEN="hf_not_a_token", HF_HUB_ETAG_TIMEOUT="2",
               HF_HUB_DOWNLOAD_TIMEOUT="2", HF_HOME=str(tmp_path / "hf-home"), OUTSIDE_LOG=str(outside),
               PYTHONPATH=os.pathsep.join([str(site), str(TESTS), env.get("PYTHONPATH", "")]))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--output-dir", str(run)],
                          capture_output=True, text=True, env=env, timeout=600)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-4000:]
    assert (run / "final" / "adapter_config.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["hub_upload"]["uploaded"] is False and summary["hub_upload"]["error"]
    assert "upload to the hub failed" in said and str(run / "final") in said
    assert not outside.exists(), outside.read_text()
