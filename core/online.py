"""The online stage: prompts in, the policy trained by RL on its own completions scored by the
reward plugins (``trl.GRPOTrainer``), its reward curve and held-out answers out."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .models import load_model, load_tokenizer, resolve_model_path
from .stage import finish_trainer, load_data, platform_defaults, trainer_callbacks
from .validate import Plan

STAGE = "online"

# GRPOConfig values that differ from TRL's defaults here, unless the recipe sets them.
ONLINE_DEFAULTS = {
    # TRL's own advantages are replaced by the advantage plugins' (posttrain_advantage_*): keep TRL's
    # computation of them to the cheapest form.
    "scale_rewards": "none",
    "logging_steps": 1,
}


def heldout_metrics(plan: Plan, trainer, heldout) -> dict:
    """Nothing beyond the greedy answers scored by the reward plugins (see stage.answer_metrics)."""
    return {}


def summary_extras(trainer) -> dict:
    """The reward curve: the mean combined reward and each source's, per logged step."""
    curve = []
    for entry in trainer.state.log_history:
        if "reward" not in entry:
            continue
        point = {"step": entry.get("step"), "reward": entry["reward"]}
        point.update({k.split("/")[1]: v for k, v in entry.items() if k.startswith("rewards/") and k.endswith("/mean")})
        curve.append(point)
    if not curve:
        return {"reward_curve": []}
    third = max(1, len(curve) // 3)
    mean = lambda points: sum(p["reward"] for p in points) / len(points)  # noqa: E731
    return {
        "reward_curve": curve,
        "reward_first_third": mean(curve[:third]),
        "reward_last_third": mean(curve[-third:]),
    }


def build_config(plan: Plan, run_dir: Path):
    """The GRPOConfig of the run; its own checks become user errors (before any model is loaded)."""
    from trl import GRPOConfig

    values = {**platform_defaults(plan.trl_config), **ONLINE_DEFAULTS, **plan.trl_config}
    try:
        return GRPOConfig(output_dir=str(run_dir), seed=plan.recipe.seed, **values)
    except ValueError as e:
        raise UserError(f"TRL refuses these settings: {e}", field="training",
                        fix="change the training values it names (see docs/recipes.md, the online stage)") from None


def build_trainer(plan: Plan, run_dir: Path):
    from .online_trainer import OnlineTrainer

    recipe = plan.recipe
    train, heldout = load_data(plan)
    config = build_config(plan, run_dir)
    path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(recipe, path)
    model, peft_config = load_model(recipe, path)
    trainer = OnlineTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                            peft_config=peft_config, callbacks=trainer_callbacks(plan, run_dir),
                            plugins=plan.plugins, stage=STAGE)
    return finish_trainer(trainer), heldout
