"""Recipe parsing and validation: every user error exits 2 with the field and the fix, before
any model is loaded, and leaves existing files alone."""

import dataclasses
import json
import sys

import pytest
import yaml
from conftest import REPO
from posttrain import trl_fields
from posttrain.errors import UserError
from posttrain.recipe import apply_override
from posttrain.pipeline import load_recipe


def test_valid_recipe_passes(cli, write_recipe):
    code, out, err = cli("validate", write_recipe())
    assert code == 0, err
    assert "is valid" in out and "dpo" in out


def test_unknown_top_level_key_suggests(cli, write_recipe):
    path = write_recipe(trainig={"max_steps": 3})
    code, _, err = cli("validate", path)
    assert code == 2
    assert "trainig: unknown key 'trainig' (did you mean 'training'?)" in err
    assert "fix:" in err and "Traceback" not in err


def test_unknown_nested_key_suggests(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(model={"lora": {"alpah": 8}}))
    assert code == 2
    assert "model.lora.alpah" in err and "did you mean 'alpha'" in err


def test_ill_typed_value(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(model={"lora": {"r": "big"}}))
    assert code == 2
    assert "model.lora.r: expected int, got 'big'" in err


def test_missing_required_section(cli, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {source: builtin:arithmetic}\n")
    code, _, err = cli("validate", path)
    assert code == 2 and "model: this key is required" in err


def test_recipe_file_missing(cli, tmp_path):
    code, _, err = cli("validate", tmp_path / "nope.yaml")
    assert code == 2 and "does not exist" in err


def test_yaml_is_data_only(cli, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    code, _, err = cli("validate", path)
    assert code == 2 and "not valid YAML" in err
    assert not marker.exists()


def test_set_overrides(write_recipe):
    path = write_recipe()
    recipe = load_recipe(path, ["training.learning_rate=1e-4", "plugins.dpo.beta=0.3", "model.lora.r=4",
                                "eval.generate=0"])
    assert recipe.training["learning_rate"] == pytest.approx(1e-4)
    assert isinstance(recipe.training["learning_rate"], float)
    assert recipe.plugins["dpo"]["beta"] == 0.3
    assert recipe.model.lora.r == 4
    assert recipe.eval.generate == 0


def test_set_bad_syntax_and_bad_key(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(), "--set", "training")
    assert code == 2 and "--set" in err
    code, _, err = cli("validate", write_recipe(), "--set", "model.lorra.r=3")
    assert code == 2 and "did you mean 'lora'" in err


def test_set_into_scalar_is_refused():
    data = {"model": {"name_or_path": "x"}}
    with pytest.raises(UserError, match="not a section"):
        apply_override(data, "model.name_or_path.sub=1")


def test_unknown_trl_field_suggests(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(training={"learning_rat": 1e-4}))
    assert code == 2
    assert "training.learning_rat: DPOConfig has no field 'learning_rat' (did you mean 'learning_rate'?)" in err


def test_trl_field_type_is_checked(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(training={"max_steps": "ten"}))
    assert code == 2 and "training.max_steps: expected int" in err


def test_managed_trl_field_points_to_plugin(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(training={"beta": 0.5}))
    assert code == 2 and "plugins.dpo.beta" in err
    code, _, err = cli("validate", write_recipe(training={"loss_type": ["ipo"]}))
    assert code == 2 and "training.loss_type" in err


@pytest.mark.parametrize("stage,cls", [("preference", "DPOConfig"), ("online", "GRPOConfig"), ("sft", "SFTConfig"),
                                       ("reward_model", "RewardConfig")])
def test_trl_fields_read_from_source_match_the_real_class(stage, cls):
    import trl

    from posttrain.stages import get_stage

    real = {f.name: f for f in dataclasses.fields(getattr(trl, cls))}
    config = get_stage(stage).config
    assert config.name == cls
    assert set(trl_fields.config_fields(config)) == set(real)
    defaults = trl_fields.config_defaults(config)
    assert {"per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate"} <= set(defaults)
    for name, value in defaults.items():  # the literal defaults read from source are the real ones
        assert real[name].default == value, name


def test_model_folder_missing(cli, write_recipe, tmp_path):
    code, _, err = cli("validate", write_recipe(model={"name_or_path": str(tmp_path / "no-model")}))
    assert code == 2 and "model.name_or_path" in err and "does not exist" in err


def test_unknown_builtin_model(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(model={"name_or_path": "builtin:smollm2-135m"}))
    assert code == 2 and "did you mean 'smollm2-135m-instruct'" in err


def test_quantization_needs_lora(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(model={"lora": None, "quantization": {"bits": 4}}))
    assert code == 2 and "model.quantization" in err and "lora" in err


def test_data_file_missing(cli, write_recipe, tmp_path):
    code, _, err = cli("validate", write_recipe(data={"source": str(tmp_path / "pairs.jsonl")}))
    assert code == 2 and "data.source: data file" in err and "does not exist" in err


def test_data_missing_column(cli, write_recipe, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "good": "a", "rejected": "b"}) + "\n")
    code, _, err = cli("validate", write_recipe(data={"source": str(data), "options": {}}))
    assert code == 2
    assert "data.columns.chosen" in err and "good" in err and "columns: {chosen:" in err


def test_data_column_mapping_fixes_it(cli, write_recipe, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "good": "a", "rejected": "b"}) + "\n")
    code, _, err = cli("validate", write_recipe(data={"source": str(data), "options": {}, "columns": {"chosen": "good"}}))
    assert code == 0, err


def test_column_mapping_to_absent_column(cli, write_recipe, tmp_path):
    data = tmp_path / "pairs.csv"
    data.write_text("question,chosen,rejected\nq,a,b\n")
    code, _, err = cli("validate", write_recipe(data={"source": str(data), "options": {}, "columns": {"prompt": "questoin"}}))
    assert code == 2 and "did you mean 'question'" in err


def test_builtin_dataset_options_checked(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(data={"options": {"n": 10, "operation": ["+"]}}))
    assert code == 2 and "data.options.operation" in err and "did you mean 'operations'" in err


def test_validate_and_plugins_do_not_import_torch(write_recipe, tmp_path):
    import subprocess

    recipe = write_recipe()
    code = (
        "import sys; from posttrain.cli import main; "
        f"rc1 = main(['validate', {str(recipe)!r}]); rc2 = main(['plugins', '--json']); rc3 = main(['recipes']); "
        "assert (rc1, rc2, rc3) == (0, 0, 0), (rc1, rc2, rc3); "
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets', 'peft') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_shipped_recipes_validate(cli, monkeypatch):
    from posttrain.cli import recipes_dir

    monkeypatch.chdir(REPO)  # paths inside recipes (DeepSpeed files) are relative to the repository root
    recipes = sorted(recipes_dir().glob("*.yaml"))
    assert recipes
    for path in recipes:
        code, _, err = cli("validate", path)
        assert code == 0, f"{path.name}: {err}"
    code, out, _ = cli("recipes")
    assert code == 0 and "quickstart" in out


def test_every_recipe_key_is_documented():
    from posttrain.recipe import schema_keys

    doc = (REPO / "docs" / "recipes.md").read_text()
    missing = [path for path, _, _ in schema_keys() if f"`{path}`" not in doc]
    assert not missing, f"docs/recipes.md lacks: {missing}"


def test_resolved_recipe_round_trips(write_recipe):
    recipe = load_recipe(write_recipe())
    again = yaml.safe_load(yaml.safe_dump(recipe.to_dict()))
    assert again == recipe.to_dict()


def test_unloadable_model_is_a_user_error(cli, write_recipe, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    code, _, err = cli("run", write_recipe(model={"name_or_path": str(broken)}), "--output-dir", tmp_path / "run")
    assert code == 2 and "model.name_or_path: cannot load the model or tokenizer" in err
    assert not (tmp_path / "run").exists()  # the failed run's fresh directory is not left behind


def test_offline_hub_id_is_a_user_error(cli, write_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = cli("run", write_recipe(model={"name_or_path": "nobody-here/no-such-model"}),
                       "--output-dir", tmp_path / "run")
    assert code == 2 and "nobody-here/no-such-model" in err and "local Hugging Face cache" in err


def test_internal_errors_exit_1_with_a_traceback(cli, write_recipe, monkeypatch):
    import posttrain.pipeline

    def broken(recipe, *args, **kwargs):
        raise RuntimeError("a bug in posttrain")

    monkeypatch.setattr(posttrain.pipeline, "validate", broken)
    code, _, err = cli("validate", write_recipe())
    assert code == 1 and "Traceback" in err and "a bug in posttrain" in err and "internal error" in err


def test_renamed_trl_field_says_what_to_write(cli, write_recipe):
    code, _, err = cli("validate", write_recipe(training={"warmup_ratio": 0.1}))
    assert code == 2 and "training.warmup_ratio" in err and "warmup_steps: 0.1" in err


def test_deepspeed_file_must_exist(cli, write_recipe, tmp_path):
    code, _, err = cli("validate", write_recipe(training={"deepspeed": str(tmp_path / "zero9.json")}))
    assert code == 2 and "training.deepspeed" in err and "does not exist" in err


GPU_RECIPES = {"tulu3-dpo-norm-8b", "rlvr-tulu3-8b", "tulu3-8b-pipeline", "ppo-8b-pipeline"}
CPU_RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml") if p.stem not in GPU_RECIPES)


@pytest.mark.slow
@pytest.mark.parametrize("name", CPU_RECIPES)
def test_shipped_cpu_recipes_run_on_the_tiny_model(cli, tiny_model_dir, tmp_path, name):
    """Every shipped CPU recipe runs as written, with only the model and the length swapped (in a pipeline,
    in every stage)."""
    path = REPO / "recipes" / f"{name}.yaml"
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages")
    prefixes = [f"stages.{s['name']}." for s in stages] if stages else [""]
    sets = [f"model.name_or_path={tiny_model_dir}"]
    for prefix in prefixes:
        sets += [f"{prefix}training.max_steps=2", f"{prefix}eval.generate=4", f"{prefix}data.options.n=80"]
    recipe = yaml.safe_load(path.read_text()) or {}
    for prefix, stage in zip(prefixes, stages or [recipe]):
        if stages and (stage.get("model") or {}).get("name_or_path") == recipe["model"]["name_or_path"]:
            sets.append(f"{prefix}model.name_or_path={tiny_model_dir}")  # a stage that starts again from the start
        if stage.get("stage") == "iterative":
            # a random model's answers tie under a verifier or a rule judge (no pair would survive): add a
            # graded reward
            sets += [f"{prefix}{key}" for key in ("plugins.online_plugins:DigitShare={}", "rounds=2",
                                                   "sampling.prompts=8", "training.max_length=512")]
    code, out, err = cli("run", path, "--output-dir", tmp_path / "run", *[a for s in sets for a in ("--set", s)])
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for stage in summary["stages"] if stages else [summary]:
        if stage["stage"] == "iterative":
            assert [r["global_step"] for r in stage["rounds"]] == [2, 2]
            continue
        assert stage["global_step"] == 2
        if stage["stage"] == "online":
            assert stage["after"]["answers"]["n"] == 4
        else:
            assert stage["after"]["heldout"]
