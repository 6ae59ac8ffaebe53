"""The held-out evaluation of every stage: the stage's own held-out numbers, and greedy answers to
held-out prompts scored by the enabled reward sources (the policy gathered first under ZeRO-3)."""

from __future__ import annotations

import contextlib

from ..rewards import score
from ..sampling import derive_seed, sample_completions
from ..validate import Plan


def _text(prompt) -> str:
    if isinstance(prompt, list):
        return " | ".join(str(m.get("content", "")) for m in prompt)
    return str(prompt)


def answer_metrics(plan: Plan, trainer, heldout) -> dict | None:
    """Greedy answers to held-out prompts, scored by the enabled reward plugins (the trainer's model)."""
    from ..reward_function import trl_keywords

    if not plan.recipe.eval.generate or heldout is None:
        return None
    with generation_model(trainer) as model, trl_keywords(trainer_state=trainer.state):
        return greedy_answers(plan, model, trainer.processing_class, heldout, trainer.accelerator.autocast())


@contextlib.contextmanager
def generation_model(trainer):
    """The trainer's policy to generate with. Under DeepSpeed ZeRO-3 each process holds a shard of every
    weight: every process gathers the whole model for the time of the block (TRL's
    unwrap_model_for_generation, as its own trainers generate), then generates on its own. Elsewhere the
    unwrapped model as it is."""
    if zero_stage(trainer) == 3:
        from trl.models import unwrap_model_for_generation

        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator, gather_deepspeed3_params=True,
                                         gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs) \
                as model:
            yield model
        return
    yield trainer.accelerator.unwrap_model(trainer.model)


def greedy_answers(plan: Plan, model, tokenizer, heldout, autocast) -> dict | None:
    """Greedy answers of ``model`` to ``eval.generate`` held-out prompts (under ``autocast``, the compute
    dtype), scored by the enabled reward plugins; None without prompts or reward plugins."""
    n = plan.recipe.eval.generate
    if n == 0 or heldout is None or "prompt" not in heldout.column_names:
        return None
    if not plan.plugins.implementers("posttrain_reward"):
        return None
    subset = heldout.select(range(min(n, len(heldout))))
    prompts = list(subset["prompt"])  # a list, as in every other call of posttrain_sample (not a datasets Column)
    generation = {"max_new_tokens": plan.recipe.eval.max_new_tokens, "do_sample": False}
    with autocast:
        samples = sample_completions(plan.plugins, model, tokenizer, prompts, 1, generation,
                                     seed=derive_seed(plan.recipe.seed, "heldout"))
    completions = [c[0] for c in samples.texts]
    columns = {c: subset[c] for c in subset.column_names}
    rewards = score(plan.plugins, prompts, completions, columns, [i[0] for i in samples.ids],
                    [t[0] for t in samples.truncated])
    scored = [r for r in rewards.total if r is not None]
    if not scored:
        return None
    return {
        "n": len(scored),
        "answer_accuracy": sum(r > 0 for r in scored) / len(scored),
        "mean_reward": sum(scored) / len(scored),
        "by_source": {name: sum(s for s in v if s is not None) / max(1, sum(s is not None for s in v))
                      for name, v in rewards.by_source.items()},
        "examples": [{"prompt": _text(p), "completion": c, "reward": r}
                     for p, c, r in list(zip(prompts, completions, rewards.total))[:3]],
    }


def evaluate(trainer_module, plan: Plan, trainer, heldout) -> dict:
    """The held-out numbers of the stage (its trainer module's ``heldout_metrics``), and the greedy answers
    scored by the reward plugins."""
    if heldout is None:
        return {}
    return {"heldout": trainer_module.heldout_metrics(plan, trainer, heldout),
            "answers": answer_metrics(plan, trainer, heldout)}


def zero_stage(trainer) -> int | None:
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    return plugin.zero_stage if plugin is not None else None
