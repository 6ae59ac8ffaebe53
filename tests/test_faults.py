"""Faults a real cluster produces, with real processes and real signals: SIGTERM (and SIGINT) saves a
checkpoint and stops with exit status 75, and --resume gives the losses of an uninterrupted run (one
process, two processes, an iterative round); a second signal stops at once; a truncated newest checkpoint
is skipped with a message; a save that fails stops with exit 2 naming the folder and the free space,
the previous checkpoint intact; a run folder that cannot be written is refused before the model loads.
A user error found by rank 0 (the run directory's checks) stops every rank of a two-process launch with
exit 2 and the same message. --resume with a larger max_steps trains a finished run on, with the losses
of the longer run uninterrupted; what else a resume may change, and what it refuses."""

import copy
import json
import os
import re
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_second_signal_stops_at_once_and_sigint_once_is_clean(tmp_path, tiny_model_dir):
    twice = _recipe(tmp_path, tiny_model_dir, "twice", signal_at={"step": 3, "times": 2})
    proc = _posttrain("run", twice, "--output-dir", tmp_path / "twice")
    assert proc.returncode == -15, proc.stderr[-2000:]  # killed by the second SIGTERM, nothing saved
    assert not (tmp_path / "twice" / "checkpoint-3").exists()
    interrupt = _recipe(tmp_path, tiny_model_dir, "interrupt", signal_at={"step": 2, "signal": "SIGINT"})
    proc = _posttrain("run", interrupt, "--output-dir", tmp_path / "interrupt")
    assert proc.returncode == PREEMPTED and "SIGINT received" in proc.stderr
    assert (tmp_path / "interrupt" / "checkpoint-2" / "posttrain-complete.json").is_file()


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# -- a user error found by one process stops every process ---------------------------------------------------

def _two_processes(folder: Path, *args, timeout=300) -> list[tuple[int, str]]:
    """``posttrain`` as two processes of one launch (the environment torchrun gives its workers: RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), CPU over gloo: each process's exit status and stderr."""
    port, procs = free_port(), []
    for rank in (0, 1):
        env = cpu_processes_env(PYTHONPATH=_env()["PYTHONPATH"], RANK=str(rank), LOCAL_RANK=str(rank),
                                WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        err = (folder / f"rank{rank}.err").open("w")
        procs.append((subprocess.Popen([sys.executable, "-m", "posttrain.cli", *map(str, args)], env=env,
                                       stdout=subprocess.DEVNULL, stderr=err, text=True), err))
    out = []
    for rank, (proc, err) in enumerate(procs):
        try:
            code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
            err.close()
        out.append((code, (folder / f"rank{rank}.err").read_text()))
    return out


@pytest.mark.slow
def test_a_user_error_found_by_rank_0_stops_every_rank_with_exit_2(tmp_path, tiny_model_dir):
    """Checks of the run directory that rank 0 makes (a resume with a changed recipe, a pipeline folder that
    exists): every rank exits 2 with the same message, none goes on into training or prints a traceback."""
    from posttrain.pipeline import load
    from posttrain.run_dirs import prepare_run_dir

    recipe = _recipe(tmp_path, tiny_model_dir, "r", training={"max_steps": 2})
    run = tmp_path / "run"
    prepare_run_dir(load(recipe).plans[0], run, resume=False, overwrite=False)  # a run started with this recipe
    ranks = _two_processes(tmp_path, "run", recipe, "--output-dir", run, "--resume",
                           "--set", "training.learning_rate=1e-4")
    for code, err in ranks:
        assert code == 2, err[-3000:]
        assert "--resume: the recipe differs from the one the run started with: training.learning_rate" in err
        assert "Traceback" not in err and "internal error" not in err

    pipeline = tmp_path / "pipeline.yaml"
    stage = yaml.safe_load(recipe.read_text())
    model = stage.pop("model")
    pipeline.write_text(yaml.safe_dump({"model": model, "stages": [{"name": "dpo", "stage": "preference", **stage}]}))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own file")
    ranks = _two_processes(tmp_path, "run", pipeline, "--output-dir", mine)
    for code, err in ranks:
        assert code == 2, err[-3000:]
        assert f"--output-dir: run directory '{mine}' already exists" in err
        assert "Traceback" not in err and "internal error" not in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_a_refused_resume_under_torchrun_is_exit_2_on_every_rank(tmp_path, tiny_model_dir):
    """The command of the report: torchrun, two CPU processes, --resume with a recipe that changes what was
    trained. Each rank's stderr (torchrun --redirects) has the message and no traceback; the launcher's report
    names exit status 2 only."""
    from posttrain.pipeline import load
    from posttrain.run_dirs import prepare_run_dir

    recipe = _recipe(tmp_path, tiny_model_dir, "r", training={"max_steps": 2})
    run = tmp_path / "run"
    prepare_run_dir(load(recipe).plans[0], run, resume=False, overwrite=False)
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", free_port(), "--log-dir", str(logs), "--redirects", "3", "-m", "posttrain.cli", "run",
           str(recipe), "--output-dir", str(run), "--resume", "--set", "training.per_device_train_batch_size=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cpu_processes_env(PYTHONPATH=_env()["PYTHONPATH"]),
                          timeout=300)
    assert proc.returncode != 0
    errs = sorted(logs.rglob("stderr.log"))
    assert len(errs) == 2, proc.stderr[-3000:]
    for path in errs:
        err = path.read_text()
        assert "the recipe differs from the one the run started with: training.per_device_train_batch_size" in err, \
            err[-3000:]
        assert "Traceback" not in err and "internal error" not in err
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)]
    assert codes and set(codes) == {2}, proc.stderr[-3000:]


# -- training a run longer -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_with_a_larger_max_steps_trains_a_finished_run_on(cli, tmp_path, tiny_model_dir):
    """A finished 6-step run resumed with max_steps 10 trains steps 7-10 from checkpoint-6, with the losses of
    an uninterrupted 10-step run (a constant learning rate: a decaying schedule is rebuilt for the new length,
    see docs/recipes.md). recipe.yaml records the new recipe, the earlier recipe and summary are kept; fewer
    steps than trained, the same length again, or a changed learning rate are refused."""
    constant = {"lr_scheduler_type": "constant"}
    longer = _recipe(tmp_path, tiny_model_dir, "longer", training={**constant, "max_steps": 10})
    proc = _posttrain("run", longer, "--output-dir", tmp_path / "whole")
    assert proc.returncode == 0, proc.stderr[-2000:]
    recipe = _recipe(tmp_path, tiny_model_dir, "six", training=constant)
    run = tmp_path / "run"
    proc = _posttrain("run", recipe, "--output-dir", run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "checkpoint-6" / "posttrain-complete.json").is_file()

    code, _, err = cli("run", recipe, "--output-dir", run, "--resume", "--set", "training.max_steps=4")
    assert code == 2 and f"training.max_steps is 4, and the run in '{run}' already trained 6 steps" in err, err
    code, _, err = cli("run", recipe, "--output-dir", run, "--resume")
    assert code == 2 and "already finished (step 6)" in err and "a larger training.max_steps" in err, err
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("recipe", "summary"))) == \
        ["recipe.yaml", "summary.json"]  # refusals touch nothing

    proc = _posttrain("run", recipe, "--output-dir", run, "--resume", "--set", "training.max_steps=10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training.max_steps: 6 -> 10" in proc.stdout and "from checkpoint-6" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 10 and summary["resumed_from"] == "checkpoint-6"
    assert json.loads((run / "summary.until-step-6.json").read_text())["global_step"] == 6
    assert sorted(_losses(run)) == list(range(1, 11))
    assert _losses(run) == pytest.approx(_losses(tmp_path / "whole"), abs=1e-6)
    assert yaml.safe_load((run / "recipe.yaml").read_text())["training"]["max_steps"] == 10
    assert yaml.safe_load((run / "recipe.until-step-6.yaml").read_text())["training"]["max_steps"] == 6

    # a later resume compares with the recipe the run went on with
    code, _, err = cli("run", recipe, "--output-dir", run, "--resume", "--set", "training.max_steps=10",
                       "--set", "training.learning_rate=1e-4")
    assert code == 2 and "differs from the one the run started with: training.learning_rate: 0.005 -> 0.0001" in err
    code, _, err = cli("run", recipe, "--output-dir", run, "--resume", "--set", "training.max_steps=10")
    assert code == 2 and "already finished (step 10)" in err


def _checkpoint(run: Path, step: int, epoch: float) -> None:
    """A complete checkpoint as --resume's checks read it: its trainer_state.json and marker."""
    from posttrain.checkpoints import mark_complete

    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": epoch}))
    mark_complete(folder, step)


def test_a_resume_may_change_how_long_a_run_trains_and_what_it_logs_only(tmp_path, tiny_model_dir):
    """The run-directory checks of --resume, on a run stopped at checkpoint-4 (no model loads): what only
    observes the run or trains it longer is taken and recorded, what changes the trained steps is refused, and
    so is a length below the one reached, in steps or epochs. An iterative stage's length (per round) is kept.
    In a pipeline, a stage that has not finished may be trained longer, a finished one is restarted with --from."""
    from posttrain.errors import UserError
    from posttrain.pipeline import load
    from posttrain.run_dirs import prepare_pipeline_dir, prepare_run_dir

    recipe = _recipe(tmp_path, tiny_model_dir, "r", training={"max_steps": 8})
    run = tmp_path / "run"

    def resume(*sets, unset=()):
        prepare_run_dir(load(recipe, list(sets), list(unset)).plans[0], run, resume=True, overwrite=False)

    prepare_run_dir(load(recipe).plans[0], run, resume=False, overwrite=False)
    _checkpoint(run, 4, epoch=0.5)
    for sets, message in ((["training.learning_rate=1e-3"], "training.learning_rate: 0.005 -> 0.001"),
                          (["training.per_device_train_batch_size=2"], "per_device_train_batch_size: 4 -> 2"),
                          (["seed=1"], "seed: 42 -> 1"), (["plugins.dpo.beta=0.5"], "plugins.dpo.beta: 0.1 -> 0.5"),
                          (["training.max_steps=3"], "training.max_steps is 3, and the run in"),
                          (["training.num_train_epochs=0.25"], None)):
        if message is None:  # by epochs: max_steps unset (TRL's -1)
            with pytest.raises(UserError, match=r"num_train_epochs is 0.25, .* already trained 0.5 epochs"):
                resume(*sets, unset=["training.max_steps"])
            continue
        with pytest.raises(UserError, match=re.escape(message)):
            resume(*sets)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-4", "recipe.yaml"]
    resume("training.max_steps=4")  # as far as it got: allowed (nothing more to train)
    resume("training.max_steps=20", "training.logging_steps=5", "training.save_total_limit=2",
           "training.report_to=none", "training.eval_steps=3")
    saved = yaml.safe_load((run / "recipe.yaml").read_text())["training"]
    assert saved["max_steps"] == 20 and saved["logging_steps"] == 5 and saved["save_total_limit"] == 2
    kept = [yaml.safe_load((run / name).read_text())["training"]["max_steps"]
            for name in ("recipe.until-step-4.yaml", "recipe.until-step-4.2.yaml")]
    assert kept == [8, 4]  # every recipe the run went on with is kept, none over another
    resume("training.max_steps=20", "training.logging_steps=5", "training.save_total_limit=2",
           "training.report_to=none", "training.eval_steps=3")  # the same again: nothing more is kept
    assert sorted(p.name for p in run.glob("recipe*")) == ["recipe.until-step-4.2.yaml", "recipe.until-step-4.yaml",
                                                           "recipe.yaml"]
    assert (run / "checkpoint-4" / "posttrain-complete.json").is_file()

    iterative = _recipe(tmp_path, tiny_model_dir, "iter", stage="iterative", rounds=2,
                        plugins={"dpo": {}, "online_plugins:DigitShare": {}},
                        data={"source": "builtin:word_problems", "options": {"n": 24}, "eval": {"fraction": 0.2}})
    rounds = tmp_path / "rounds"
    prepare_run_dir(load(iterative).plans[0], rounds, resume=False, overwrite=False)
    with pytest.raises(UserError, match="training.max_steps: 6 -> 9"):
        prepare_run_dir(load(iterative, ["training.max_steps=9"]).plans[0], rounds, resume=True, overwrite=False)

    stage = yaml.safe_load(recipe.read_text())
    model = stage.pop("model")
    pipeline = tmp_path / "pipeline.yaml"
    stages = [{"name": name, "stage": "preference", **copy.deepcopy(stage)} for name in ("a", "b")]
    pipeline.write_text(yaml.safe_dump({"model": model, "stages": stages}))
    top = tmp_path / "pipe"
    prepare_pipeline_dir(load(pipeline), top, resume=False, overwrite=False, start_from=None)
    (top / "01-a").mkdir()
    (top / "01-a" / "summary.json").write_text("{}")  # stage a finished, b was stopped

    def go_on(*sets):
        prepare_pipeline_dir(load(pipeline, list(sets)), top, resume=True, overwrite=False, start_from=None)

    with pytest.raises(UserError, match=re.escape("stages: a (training.max_steps: 8 -> 12)")):
        go_on("stages.a.training.max_steps=12")
    with pytest.raises(UserError, match=re.escape("stages: b (training.learning_rate: 0.005 -> 0.001)")):
        go_on("stages.b.training.learning_rate=1e-3")
    go_on("stages.b.training.max_steps=12", "stages.a.training.logging_steps=4")
    saved = yaml.safe_load((top / "recipe.yaml").read_text())["stages"]
    assert saved[1]["training"]["max_steps"] == 12 and saved[0]["training"]["logging_steps"] == 4
    assert yaml.safe_load((top / "recipe.earlier.yaml").read_text())["stages"][1]["training"]["max_steps"] == 8
