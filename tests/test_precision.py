"""Precision: trained weights are float32 masters with autocast to the compute dtype by default;
frozen weights (LoRA base, the full fine-tuning reference) are stored in the compute dtype; pure bf16
training only when a recipe asks for it (model.trained_dtype), with a warning.

On a CPU, ``model.dtype: bfloat16`` gives the same mixed precision a bf16 GPU gets by default
(TRL's bf16 autocast, with use_cpu), so the mechanism is tested here without a GPU."""

import json
from pathlib import Path

import pytest
import torch
from posttrain.models import resolve_precision
from posttrain.recipe import ModelSection
from safetensors.torch import load_file


@pytest.mark.parametrize("dtype, trained, cuda, bf16_ok, expected", [
    ("auto", "float32", True, True, ("bfloat16", "float32")),  # a bf16 GPU: float32 masters, bf16 compute
    ("auto", "float32", True, False, ("float16", "float32")),  # an older GPU: fp16 autocast with loss scaling
    ("auto", "float32", False, False, ("float32", "float32")),  # a CPU
    ("auto", "bfloat16", True, True, ("bfloat16", "bfloat16")),  # pure bf16, asked for by name
    ("bfloat16", "float32", False, False, ("bfloat16", "float32")),  # CPU autocast to bf16
    ("float32", "float32", True, True, ("float32", "float32")),
])
def test_precision_resolution(dtype, trained, cuda, bf16_ok, expected):
    p = resolve_precision(ModelSection(name_or_path="x", dtype=dtype, trained_dtype=trained), cuda=cuda,
                          bf16_supported=bf16_ok)
    assert (p.compute, p.trained) == expected
    assert p.trl_flags == {"bf16": expected[0] == "bfloat16", "fp16": expected[0] == "float16"}


def _build(write_recipe, tmp_path, **model):
    from posttrain.pipeline import load_recipe
    from posttrain.trainers.preference import build_trainer
    from posttrain.validate import validate

    recipe = write_recipe(model={"lora": None, **model}) if "lora" not in model else write_recipe(model=model)
    trainer, _ = build_trainer(validate(load_recipe(recipe)), tmp_path / "run")
    return trainer


def test_full_finetuning_keeps_float32_masters_and_a_compute_dtype_reference(write_recipe, tmp_path):
    trainer = _build(write_recipe, tmp_path, dtype="bfloat16")
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.ref_model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert trainer.args.bf16 and not trainer.args.fp16  # autocast to the compute dtype


def test_lora_base_in_compute_dtype_adapter_in_float32(write_recipe, tmp_path):
    trainer = _build(write_recipe, tmp_path, dtype="bfloat16", lora={"r": 8, "alpha": 16, "modules_to_save": ["lm_head"]})
    trained = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}, trained
    assert any("modules_to_save" in n for n in trained)  # a full module copied from the bf16 base: cast too
    assert set(frozen.values()) == {torch.bfloat16}


def test_pure_bf16_is_asked_for_by_name_and_warned(write_recipe, tmp_path):
    with pytest.warns(UserWarning, match="rounded away"):
        trainer = _build(write_recipe, tmp_path, dtype="bfloat16", trained_dtype="bfloat16")
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}


def _changed(run: Path, start: Path) -> tuple[float, float]:
    """Share of weight elements that moved, and the median relative change per tensor."""
    before, after = load_file(start / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    moved = total = 0
    ratios = []
    for name, new in after.items():
        old = before[name].to(new.dtype)  # the starting weights as the run held them
        diff = (new.float() - old.float()).abs()
        moved += int((diff > 0).sum())
        total += diff.numel()
        ratios.append(float(diff.norm() / old.float().norm().clamp(min=1e-12)))
    return moved / total, sorted(ratios)[len(ratios) // 2]


@pytest.mark.slow
def test_tiny_learning_rate_updates_survive_in_the_default_precision(cli, write_recipe, tmp_path, tiny_model_dir):
    """Full fine-tuning at lr 1e-6 (constant), bf16 compute: with float32 masters (the default) the
    weights move as in a float32 run; stored in bf16 (what `dtype: auto` gave on a bf16 GPU before)
    almost every update is rounded away."""
    training = {"learning_rate": 1e-6, "lr_scheduler_type": "constant", "max_steps": 4, "save_strategy": "no"}
    variants = {"float32": {"dtype": "float32"}, "default_bf16_compute": {"dtype": "bfloat16"},
                "pure_bf16": {"dtype": "bfloat16", "trained_dtype": "bfloat16"}}
    moved = {}
    for name, model in variants.items():
        recipe = write_recipe(name, model={"lora": None, **model}, training=training,
                              eval={"before": False, "generate": 0}, data={"eval": {"fraction": 0.0}})
        code, _, err = cli("run", recipe, "--output-dir", tmp_path / name)
        assert code == 0, err
        moved[name] = _changed(tmp_path / name, tiny_model_dir)
    share32, median32 = moved["float32"]
    share, median = moved["default_bf16_compute"]
    pure_share, pure_median = moved["pure_bf16"]
    assert share32 > 0.5
    assert share == pytest.approx(share32, rel=0.05)
    assert median == pytest.approx(median32, rel=0.25)
    assert pure_share < 0.1 * share, moved
    assert pure_median < 0.2 * median, moved
    print(json.dumps(moved))


def test_trained_dtype_needs_a_compatible_compute_dtype(cli, write_recipe):
    recipe = write_recipe(model={"dtype": "float16", "trained_dtype": "bfloat16"})
    code, _, err = cli("validate", recipe)
    assert code == 2 and "model.trained_dtype" in err


@pytest.mark.parametrize("field", ["bf16", "fp16"])
def test_autocast_flags_are_set_through_model_dtype(cli, write_recipe, field):
    code, _, err = cli("validate", write_recipe(training={field: True}))
    assert code == 2 and f"training.{field}" in err and "model.dtype" in err
