"""TRL's, transformers' and pluggy's private names that posttrain relies on (posttrain.seams): each one
resolves in the installed versions, a built trainer has the attributes posttrain reads, and a moved name
is reported by name."""

import pytest


def test_every_seam_resolves_in_the_installed_versions():
    from posttrain.seams import problems

    assert problems() == []


def test_a_moved_name_is_reported_by_name(monkeypatch):
    import trl.data_utils
    import trl.trainer.grpo_trainer as grpo
    from posttrain.seams import problems

    monkeypatch.delattr(trl.data_utils, "_tokenize")
    monkeypatch.delattr(grpo.GRPOTrainer, "_calculate_rewards")
    found = problems()
    assert any("trl.data_utils._tokenize is gone" in p for p in found)
    assert any("trl.GRPOTrainer._calculate_rewards is gone" in p for p in found)


@pytest.mark.parametrize("stage", ["preference", "online"])
def test_built_trainers_have_the_attributes_posttrain_reads(stage, write_recipe, online_recipe, tmp_path):
    from posttrain.pipeline import load_recipe
    from posttrain.seams import missing_attributes
    from posttrain.validate import validate

    recipe = online_recipe() if stage == "online" else write_recipe()
    module = __import__(f"posttrain.trainers.{stage}", fromlist=["build_trainer"])
    trainer, _ = module.build_trainer(validate(load_recipe(recipe)), tmp_path / "run")
    assert missing_attributes(trainer) == []
