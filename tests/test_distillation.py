"""The distillation stage (TRL's DistillationTrainer): its loss against the divergences written out from the
teacher's and the student's logits, a run in which the student moves towards a different teacher, a pipeline
whose teacher is an earlier stage, and what validate refuses before anything loads."""

import json

import pytest
import torch
import yaml
from conftest import read_jsonl

from posttrain.testing import build_tiny_model


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A wider, differently initialised model with the tiny model's tokenizer (the same vocabulary)."""
    return build_tiny_model(tmp_path_factory.mktemp("teacher"), hidden=96, layers=3, seed=7)


def _recipe(folder, student, teacher, **training):
    path = folder / "distil.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "distillation", "teacher": str(teacher),
        "model": {"name_or_path": str(student), "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"source": "builtin:word_problems", "options": {"n": 48}, "eval": {"fraction": 0.25}},
        "training": {"learning_rate": 5e-3, "per_device_train_batch_size": 4, "max_completion_length": 8,
                     "max_steps": 2, "save_strategy": "no", **training},
        "eval": {"generate": 0}}, sort_keys=False))
    return path


def _by_hand(student_logits, teacher_logits, mask, beta, temperature):
    """The divergence per completion token, from the logits, averaged over the tokens in the mask."""
    log_q = torch.log_softmax(student_logits.double() / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.double() / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if beta == 0:
        per_token = (p * (log_p - log_q)).sum(-1)
    elif beta == 1:
        per_token = (q * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        per_token = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.3, 0.7)])
def test_the_loss_is_the_divergence_by_hand(tmp_path, tiny_model_dir, teacher_dir, beta, temperature):
    from posttrain.pipeline import load_recipe
    from posttrain.trainers.distillation import build_trainer
    from posttrain.validate import validate

    recipe = _recipe(tmp_path, tiny_model_dir, teacher_dir, beta=beta, temperature=temperature)
    trainer, _ = build_trainer(validate(load_recipe(recipe)), tmp_path / "run")
    model, teacher = trainer.model, trainer.teacher_model
    with torch.no_grad():  # move the LoRA adapter off zero, so that the student is not its base
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, 500, (3, 4), generator=generator)
    completion_ids = torch.randint(3, 500, (3, 5), generator=generator)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
              "completion_ids": completion_ids, "completion_mask": completion_mask}
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, inputs)
        ids = torch.cat([prompt_ids, completion_ids], 1)
        attention = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
        student = model(input_ids=ids, attention_mask=attention).logits[:, 3:-1]
        reference = teacher(input_ids=ids, attention_mask=attention).logits[:, 3:-1]
    expected = _by_hand(student, reference, completion_mask, beta, temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert expected.item() > 1e-3  # a different teacher: the test would see a wrong formula


@pytest.mark.slow
def test_a_run_moves_the_student_towards_the_teacher(cli, tmp_path, tiny_model_dir, teacher_dir):
    """Twelve steps of forward KL at a high learning rate: the held-out divergence to the teacher (TRL's
    evaluation on the student's own samples) falls, and the loss is logged at every step."""
    recipe = _recipe(tmp_path, tiny_model_dir, teacher_dir, beta=0.0, max_steps=12, learning_rate=2e-2,
                     per_device_eval_batch_size=4)
    code, out, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    before, after = summary["before"]["heldout"]["divergence"], summary["after"]["heldout"]["divergence"]
    assert after < 0.8 * before, (before, after)
    assert summary["teacher"] == str(teacher_dir)
    losses = [m["loss"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 12
    assert "held-out divergence (teacher)" in out


@pytest.mark.slow
def test_a_pipeline_distils_an_earlier_stage_into_the_start_model(cli, tmp_path, tiny_model_dir):
    """SFT trains a teacher; the distillation stage starts again from the untrained model and names the
    teacher `stages.teacher`."""
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "stages": [
            {"name": "teacher", "stage": "sft",
             "data": {"source": "builtin:arithmetic", "options": {"n": 48}, "columns": {"completion": "chosen"}},
             "training": {"learning_rate": 1e-2, "per_device_train_batch_size": 8, "max_steps": 6}},
            {"name": "student", "stage": "distillation", "teacher": "stages.teacher",
             "model": {"name_or_path": str(tiny_model_dir)},
             "data": {"source": "builtin:word_problems", "options": {"n": 32}, "eval": {"fraction": 0.25}},
             "training": {"learning_rate": 1e-2, "per_device_train_batch_size": 4, "max_completion_length": 6,
                          "max_steps": 3}},
        ]}, sort_keys=False))
    code, _, err = cli("validate", recipe)
    assert code == 0, err
    code, _, err = cli("run", recipe, "--output-dir", tmp_path / "run")
    assert code == 0, err
    student = json.loads((tmp_path / "run" / "02-student" / "summary.json").read_text())
    assert student["teacher"] == str((tmp_path / "run" / "01-teacher" / "merged").resolve())
    assert student["global_step"] == 3 and student["after"]["heldout"]["divergence"] > 0


def test_validate_refuses_what_cannot_work(cli, tmp_path, tiny_model_dir, teacher_dir):
    recipe = _recipe(tmp_path, tiny_model_dir, teacher_dir)
    data = yaml.safe_load(recipe.read_text())
    del data["teacher"]
    recipe.write_text(yaml.safe_dump(data))
    code, _, err = cli("validate", recipe)
    assert code == 2 and "teacher" in err, err

    other = build_tiny_model(tmp_path / "other-vocab", vocab=520)
    recipe = _recipe(tmp_path, tiny_model_dir, other)
    code, _, err = cli("validate", recipe)
    assert code == 2 and "error: teacher:" in err and "520 tokens and the student's 600" in err, err

    for key, words in (("lmbda", "student's own samples"), ("teacher_model_name_or_path", "`teacher` key"),
                       ("max_length", "max_completion_length")):
        recipe = _recipe(tmp_path, tiny_model_dir, teacher_dir, **{key: 0.5 if key == "lmbda" else "x"})
        code, _, err = cli("validate", recipe)
        assert code == 2 and f"training.{key}" in err and words in err, (key, err)


def test_the_stage_is_listed(cli):
    code, out, _ = cli("stages")
    assert code == 0 and "distillation" in out and "trl.DistillationTrainer" in out


@pytest.mark.slow
def test_resume_trains_a_finished_run_on_from_its_checkpoint(cli, tmp_path, tiny_model_dir, teacher_dir):
    recipe = _recipe(tmp_path, tiny_model_dir, teacher_dir, max_steps=3, save_strategy="steps", save_steps=3)
    run = tmp_path / "run"
    code, _, err = cli("run", recipe, "--output-dir", run)
    assert code == 0, err
    code, out, err = cli("run", recipe, "--output-dir", run, "--resume", "--set", "training.max_steps=5")
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 5 and summary["resumed_from"] == "checkpoint-3"
    assert sorted(m["step"] for m in read_jsonl(run / "metrics.jsonl") if "loss" in m) == [1, 2, 3, 4, 5]
