"""Faults a real cluster produces, with real processes and real signals: SIGTERM (and SIGINT) saves a
checkpoint and stops with exit status 75, and --resume gives the losses of an uninterrupted run (one
process, two processes, an iterative round); a second signal stops at once; a truncated newest checkpoint
is skipped with a message; a save that fails stops with exit 2 naming the folder and the free space,
the previous checkpoint intact; a run folder that cannot be written is refused before the model loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cpu_processes_env, free_port, read_jsonl

PREEMPTED = 75
TESTS = Path(__file__).resolve().parent


def _env(**extra):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **extra}


def _recipe(tmp_path, tiny_model_dir, name, signal_at=None, training=None, plugins=None, **extra):
    plugins = dict(plugins or {"dpo": {"beta": 0.1}})
    if signal_at is not None:
        plugins["trust_plugins:SignalAt"] = signal_at
    data = {
        "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                  "dtype": "float32"},
        "data": {"source": "builtin:arithmetic", "options": {"n": 64}, "eval": {"fraction": 0.25}},
        "plugins": plugins,
        "training": {"learning_rate": 5e-3, "per_device_train_batch_size": 4, "max_steps": 6, "logging_steps": 1,
                     "save_steps": 100, "max_length": 64, **(training or {})},
        "eval": {"generate": 0, "before": False},
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _posttrain(*args, launcher=(), env=None, timeout=600):
    cmd = [*(launcher or [sys.executable]), *([] if launcher else []), "-m", "posttrain.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=timeout)


def _losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r and "eval_loss" not in r}


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny_model_dir):
    """The losses of the 6-step run uninterrupted (a signal handler installed, no signal sent)."""
    folder = tmp_path_factory.mktemp("whole")
    never = _recipe(folder, tiny_model_dir, "never", signal_at={"step": 99})
    proc = _posttrain("run", never, "--output-dir", folder / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _losses(folder / "run")


def test_sigterm_saves_stops_and_resume_gives_the_uninterrupted_losses(tmp_path, tiny_model_dir, whole):
    recipe = _recipe(tmp_path, tiny_model_dir, "stopped", signal_at={"step": 3})
    run = tmp_path / "run"
    proc = _posttrain("run", recipe, "--output-dir", run)
    assert proc.returncode == PREEMPTED, proc.stderr[-2000:]
    assert "SIGTERM received" in proc.stderr and "after step 3" in proc.stderr
    assert f"continue with: posttrain run {recipe} --output-dir {run} --resume" in proc.stderr
    record = json.loads((run / "preempted.json").read_text())
    assert record["step"] == 3 and record["signal"] == "SIGTERM" and record["stage"] == "preference"
    assert (run / "checkpoint-3" / "posttrain-complete.json").is_file()  # saved at the signal, marked complete
    assert not (run / "summary.json").exists() and not (run / "final").exists()
    assert max(_losses(run)) == 3

    proc = _posttrain("run", recipe, "--output-dir", run, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (run / "preempted.json").exists()
    resumed = _losses(run)
    assert sorted(resumed) == sorted(whole) == list(range(1, 7))
    assert resumed == pytest.approx(whole, abs=1e-6)


def test_a_second_signal_stops_at_once_and_sigint_once_is_clean(tmp_path, tiny_model_dir):
    twice = _recipe(tmp_path, tiny_model_dir, "twice", signal_at={"step": 3, "times": 2})
    proc = _posttrain("run", twice, "--output-dir", tmp_path / "twice")
    assert proc.returncode == -15, proc.stderr[-2000:]  # killed by the second SIGTERM, nothing saved
    assert not (tmp_path / "twice" / "checkpoint-3").exists()
    interrupt = _recipe(tmp_path, tiny_model_dir, "interrupt", signal_at={"step": 2, "signal": "SIGINT"})
    proc = _posttrain("run", interrupt, "--output-dir", tmp_path / "interrupt")
    assert proc.returncode == PREEMPTED and "SIGINT received" in proc.stderr
    assert (tmp_path / "interrupt" / "checkpoint-2" / "posttrain-complete.json").is_file()


def test_a_truncated_newest_checkpoint_is_skipped_and_none_complete_is_an_error(tmp_path, tiny_model_dir, whole):
    """A kill during the newest checkpoint's save: --resume skips it with a message and gives the
    uninterrupted losses. A copy of the same folder whose every checkpoint is broken: exit 2 naming the
    folder, nothing deleted."""
    import shutil

    recipe = _recipe(tmp_path, tiny_model_dir, "cut", signal_at={"step": 3}, training={"save_steps": 1})
    run = tmp_path / "run"
    assert _posttrain("run", recipe, "--output-dir", run).returncode == PREEMPTED
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    # a kill during the save of checkpoint-3: its optimizer state half-written, no marker
    newest = run / "checkpoint-3"
    (newest / "posttrain-complete.json").unlink()
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    proc = _posttrain("run", recipe, "--output-dir", run, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr
    assert "resuming from checkpoint-2; skipped checkpoint-3 (optimizer.pt is truncated or unreadable)" in said
    assert newest.is_dir()  # skipped, not deleted (the run's own later save replaced its files)
    assert _losses(run) == pytest.approx(whole, abs=1e-6)

    # stopped after its last checkpoint, before its summary: --resume trains no step more
    import torch
    from safetensors.torch import load_file

    (run / "summary.json").unlink()
    shutil.rmtree(run / "final")
    proc = _posttrain("run", recipe, "--output-dir", run, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in run.glob("checkpoint-*"))[-1] == "checkpoint-6" and not (run / "checkpoint-7").exists()
    assert _losses(run) == pytest.approx(whole, abs=1e-6)  # still the six steps
    assert json.loads((run / "summary.json").read_text())["global_step"] == 6
    final, last = load_file(run / "final" / "adapter_model.safetensors"), \
        load_file(run / "checkpoint-6" / "adapter_model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)

    for folder in broken.glob("checkpoint-*"):
        (folder / "posttrain-complete.json").unlink(missing_ok=True)
        (folder / "trainer_state.json").write_text('{"global_step": ')
    proc = _posttrain("run", recipe, "--output-dir", broken, "--resume")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"'{broken}' has no complete checkpoint" in proc.stderr and "trainer_state.json is truncated" in proc.stderr
    assert sorted(p.name for p in broken.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_a_failed_save_stops_with_exit_2_and_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path, tiny_model_dir, "blocked", training={"save_steps": 2},
                     plugins={"dpo": {}, "trust_plugins:BlockCheckpoint": {"step": 4}})
    run = tmp_path / "run"
    proc = _posttrain("run", recipe, "--output-dir", run)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"saving {run / 'checkpoint-4'} failed at step 4" in proc.stderr and "MiB free there" in proc.stderr
    assert "the previous checkpoint, checkpoint-2, is intact" in proc.stderr and "Traceback" not in proc.stderr
    assert (run / "checkpoint-2" / "posttrain-complete.json").is_file() and (run / "metrics.jsonl").is_file()


def _mount_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return proc.returncode == 0


def test_a_full_disk_stops_the_run_and_loses_nothing(tmp_path, tiny_model_dir):
    """A run on a small tmpfs: the first checkpoint fits, the second does not (ENOSPC)."""
    probe = _recipe(tmp_path, tiny_model_dir, "probe", training={"max_steps": 2, "save_steps": 2})
    assert _posttrain("run", probe, "--output-dir", tmp_path / "probe").returncode == 0
    one = sum(p.stat().st_size for p in (tmp_path / "probe" / "checkpoint-2").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, int(one * 1.6) + 64 * 1024):
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN); the blocked-folder test covers the handling")
    try:
        recipe = _recipe(tmp_path, tiny_model_dir, "full", training={"save_steps": 2})
        proc = _posttrain("run", recipe, "--output-dir", disk / "run")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "failed at step 4" in proc.stderr and "checkpoint-2, is intact" in proc.stderr
        assert (disk / "run" / "checkpoint-2" / "posttrain-complete.json").is_file()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_run_folder_that_cannot_be_written_is_refused_before_loading(cli, tmp_path, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = cli("run", _recipe(tmp_path, tiny_model_dir, "r"), "--output-dir", blocker / "run")
    assert code == 2 and "cannot create the run folder" in err and "--output-dir" in err


def test_two_processes_stop_at_the_same_step_and_resume(tmp_path, tiny_model_dir):
    """A signal to one of two processes: both save and stop after the same step; --resume under the same
    launcher gives the losses of an uninterrupted two-process run."""
    def launch(recipe, out, *more):
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", free_port(), "-m", "posttrain.cli", "run", str(recipe), "--output-dir", str(out),
               *more]
        env = cpu_processes_env(PYTHONPATH=_env()["PYTHONPATH"])
        return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, timeout=900)

    training = {"per_device_train_batch_size": 2, "max_steps": 5}
    never = _recipe(tmp_path, tiny_model_dir, "never", signal_at={"step": 99}, training=training)
    assert launch(never, tmp_path / "whole").returncode == 0
    recipe = _recipe(tmp_path, tiny_model_dir, "one-rank", signal_at={"step": 2, "rank": 1}, training=training)
    run = tmp_path / "run"
    proc = launch(recipe, run)
    assert proc.returncode != 0  # the launcher reports its workers' status 75 as a failure
    assert "SIGTERM received (rank 1)" in proc.stderr
    assert json.loads((run / "preempted.json").read_text())["step"] == 2
    assert (run / "checkpoint-2" / "posttrain-complete.json").is_file() and not (run / "checkpoint-3").exists()
    proc = launch(recipe, run, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(run) == pytest.approx(_losses(tmp_path / "whole"), abs=1e-5)


def test_an_iterative_round_stopped_by_a_signal_resumes_where_it_landed(tmp_path, tiny_model_dir):
    extra = {"stage": "iterative", "rounds": 2, "seed": 3,
             "sampling": {"samples": 3, "prompts": 6, "max_new_tokens": 8, "batch_size": 3}}
    plugins = {"dpo": {"beta": 0.1}, "online_plugins:DigitShare": {}}
    common = dict(training={"max_steps": 2, "max_length": 512, "save_steps": 1},
                  data={"source": "builtin:word_problems", "options": {"n": 24}, "eval": {"fraction": 0.2}})
    never = _recipe(tmp_path, tiny_model_dir, "never", signal_at={"step": 99}, plugins=plugins, **common, **extra)
    assert _posttrain("run", never, "--output-dir", tmp_path / "whole").returncode == 0
    recipe = _recipe(tmp_path, tiny_model_dir, "stopped", signal_at={"step": 1, "once": str(tmp_path / "sent")},
                     plugins=plugins, **common, **extra)
    run = tmp_path / "run"
    proc = _posttrain("run", recipe, "--output-dir", run)
    assert proc.returncode == PREEMPTED, proc.stderr[-2000:]
    assert json.loads((run / "preempted.json").read_text())["stage"] == "iterative"
    assert (run / "round-01" / "checkpoint-1" / "posttrain-complete.json").is_file()
    assert not (run / "round-01" / "round.json").exists()
    proc = _posttrain("run", recipe, "--output-dir", run, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for r in ("round-01", "round-02"):
        assert read_jsonl(run / r / "pairs.jsonl") == read_jsonl(tmp_path / "whole" / r / "pairs.jsonl")
    assert _losses(run) == pytest.approx(_losses(tmp_path / "whole"), abs=1e-5)
