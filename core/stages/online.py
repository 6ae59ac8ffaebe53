"""``stage: online``: RL on the policy's own completions scored by reward plugins (GRPO, RLOO, RLVR, and PPO
with a critic), on TRL's GRPOTrainer (``posttrain.trainers.online``)."""

from __future__ import annotations

import importlib.util

from ..errors import UserError
from ..process import world_size
from ..stage import COMMON_MANAGED, COMMON_RENAMED, SETUP_HOOKS, MemoryFacts, Panel, trl_config
from .trainer_stage import TrainerStage

# The online stage's prompt length when the command line does not give one (GRPO does not truncate prompts).
DEFAULT_PROMPT_LENGTH = 512


class OnlineStage(TrainerStage):
    name = "online"
    about = "RL on the policy's own completions scored by reward plugins (GRPO, RLOO, RLVR, PPO with a critic)"
    trainer = "trl.GRPOTrainer"
    trainer_module = "online"
    config = trl_config("trl", "trainer/grpo_config.py", "GRPOConfig")
    layouts = (("prompt",),)
    generates = True
    managed = {
        "scale_rewards": "advantages are plugins: enable advantage_norm (scope: group or batch) to scale them",
        "multi_objective_aggregation": "reward sources combine as a weighted sum (their `weight` options); shape "
                                       "advantages with posttrain_advantage_transform plugins such as advantage_norm",
        "reward_weights": "set the `weight` option of each reward plugin",
        **COMMON_MANAGED,
    }
    renamed = {
        **COMMON_RENAMED,
        "max_length": "use max_completion_length (the generated part; GRPO does not truncate prompts)",
        "max_prompt_length": "use data.max_prompt_length (prompts cut on the left or dropped, counted; GRPOTrainer "
                             "itself does not truncate prompts)",
    }
    hooks = (*SETUP_HOOKS, "posttrain_reference_needed", "posttrain_sample", "posttrain_reward",
             "posttrain_filter_groups", "posttrain_advantage_estimate", "posttrain_advantage_transform",
             "posttrain_critic", "posttrain_update_reference")
    required_hooks = ("posttrain_reward", "posttrain_advantage_estimate")
    reward_arguments = ("prompt", "completion", "completion_ids")  # GRPOTrainer's own, not passed as columns
    has_reference = True
    pipeline_keys = ("reward_first_third", "reward_last_third")
    panels = (Panel("reward", "mean training reward (all sources, weighted)", ("reward",)),
              Panel("reward_by_source", "training reward: {key}", ("rewards/*/mean",), split=True),
              Panel("kl", "KL to the reference (in the loss, or in the reward)", ("kl", "kl_in_reward")),
              Panel("length", "completion length (tokens)", ("completions/mean_length",)),
              Panel("clipped", "clipped share of the policy ratio", ("clip_ratio/region_mean",)),
              Panel("value_loss", "critic: value loss", ("critic/value_loss",)),
              Panel("explained_variance", "critic: explained variance of the returns (1 = perfect)",
                    ("critic/explained_variance",)),
              Panel("value_clipped", "critic: clipped share of the value loss", ("critic/clipped_share",)),
              # evaluation during training (eval_strategy): greedy answers to the held-out prompts
              Panel("eval_answer_accuracy", "greedy answer accuracy (held out, during training)",
                    ("eval_answer_accuracy",)),
              Panel("eval_reward", "greedy answers' mean reward (held out, during training)", ("eval_reward",)),
              Panel("eval_reward_by_source", "greedy answers' reward (held out, during training): {key}",
                    ("eval_rewards/*/mean",), split=True))

    def defaults(self) -> dict:
        from ..trl_fields import config_defaults

        return config_defaults(self.config)

    def check(self, plan) -> None:
        """What GRPOConfig and GRPOTrainer would refuse, said in recipe terms before anything loads."""
        from ..validate import online_batch

        recipe, trl_config, plugins = plan.recipe, plan.trl_config, plan.plugins
        if recipe.model.reference is not None and recipe.model.lora is not None:
            raise UserError("TRL's GRPOTrainer uses the adapter-disabled base as the reference with LoRA and takes no "
                            "separate reference", field="model.reference",
                            fix="remove model.reference (the reference is then the starting model), or train without "
                                "LoRA")
        batch = online_batch(trl_config, self.defaults())
        critic = bool(plugins.implementers("posttrain_critic"))
        if batch["group"] is None or batch["group"] < (1 if critic else 2):
            raise UserError(f"num_generations must be at least 2 (completions per prompt: the group is the baseline) "
                            f"without a critic, got {batch['group']}", field="training.num_generations",
                            fix="use e.g. num_generations: 4, or enable a critic (plugins: critic, gae) for one "
                                "completion per prompt")
        if batch["group"] == 1 and batch["generation_batch"] < 2:
            raise UserError("one completion per prompt needs a generation batch of at least 2 completions",
                            field="training.per_device_train_batch_size", fix="use per_device_train_batch_size >= 2")
        if batch["generation_batch"] % batch["group"]:
            raise UserError(
                f"a generation batch of {batch['generation_batch']} completions (per_device_train_batch_size "
                f"{batch['per_device']} x {world_size()} process(es) x steps_per_generation) does not split into "
                f"groups of num_generations={batch['group']}", field="training.num_generations",
                fix="make per_device_train_batch_size x processes x gradient_accumulation_steps a multiple of "
                    "num_generations, or let the large_batch plugin derive them from prompts_per_update")
        check_group_filter(batch, plugins)
        beta = trl_config.get("beta", self.defaults().get("beta"))
        wanting = [name for name, needed in plugins.call_each("posttrain_reference_needed", stage=self.name) if needed]
        if wanting and not beta:
            raise UserError(
                f"plugin '{wanting[0]}' needs a reference model, which the online stage only has with a KL penalty "
                f"(training.beta is {beta})", field="training.beta",
                fix="set training.beta > 0 (e.g. 0.05, Tülu 3's RLVR value), or remove the plugin")
        check_generation_engine(trl_config, plugins)
        evaluates = trl_config.get("eval_strategy") not in (None, "no") or trl_config.get("eval_on_start")
        if evaluates and recipe.eval.generate < 1:
            raise UserError("evaluation during training (eval_strategy, eval_on_start) answers eval.generate held-out "
                            "prompts greedily, and eval.generate is 0", field="eval.generate",
                            fix="set eval.generate to the number of held-out prompts to answer (e.g. 64), or remove "
                                "training.eval_strategy")

    def memory(self, cfg, plugins, recipe, *, prompt_length, max_positions, processes) -> MemoryFacts:
        per_device = int(cfg.get("per_device_train_batch_size") or 8)
        grad_accum = int(cfg.get("gradient_accumulation_steps") or 1)
        completion = int(cfg.get("max_completion_length") or 256)
        prompt = prompt_length if prompt_length is not None else DEFAULT_PROMPT_LENGTH
        facts = MemoryFacts(rows=per_device, seq_len=prompt + completion, scored_tokens=per_device * completion,
                            prompt_len=prompt, completion_len=completion, unit="completions")
        if prompt_length is None:
            facts.notes.append(f"online: prompts assumed {DEFAULT_PROMPT_LENGTH} tokens long (GRPO does not truncate "
                               "them); give --prompt-length for yours")
        steps = int(cfg.get("steps_per_generation") or grad_accum)
        generation_batch = cfg.get("generation_batch_size")
        facts.generation_rows = int(generation_batch) // processes if generation_batch else per_device * steps
        if generation_batch and not cfg.get("steps_per_generation"):
            steps = max(1, int(generation_batch) // (per_device * processes))
        # TRL generates every steps_per_generation x num_iterations micro-batches: between optimizer steps when
        # that is a multiple of the accumulation steps, else with gradients accumulated
        facts.generation_between_steps = (steps * int(cfg.get("num_iterations") or 1)) % grad_accum == 0
        facts.gather_for_generation = bool(cfg.get("ds3_gather_for_generation", True))
        if cfg.get("use_vllm"):
            if cfg.get("vllm_mode", "colocate") == "colocate":
                facts.vllm_fraction = float(cfg.get("vllm_gpu_memory_utilization") or 0.3)
                facts.notes.append(f"vLLM colocated: it reserves {facts.vllm_fraction:.0%} of the GPU for generation")
            else:
                facts.notes.append("vLLM server mode: generation runs on other GPUs (not counted)")
                facts.generation_rows = 0
        if (cfg.get("beta") or 0.0) > 0:
            facts.reference = "copy" if recipe.model.lora is None else "adapter"
        return facts


def check_group_filter(batch: dict, plugins) -> None:
    """A group filter (``posttrain_filter_groups``) needs groups to judge, and each process's share of the
    generation batch made of whole groups (it replaces groups one by one on the process that holds them)."""
    filters = plugins.implementers("posttrain_filter_groups")
    if not filters:
        return
    if batch["group"] < 2:
        raise UserError(f"plugin '{filters[0]}' drops groups of completions that all got the same reward, and with "
                        "num_generations 1 every group is one completion", field=f"plugins.{filters[0]}",
                        fix="use num_generations >= 2 (e.g. 4 or 8), or disable the plugin (a critic's baseline "
                            "needs no group)")
    local = batch["generation_batch"] // world_size()
    if local % batch["group"]:
        raise UserError(f"plugin '{filters[0]}' refills the batch group by group, and each process's "
                        f"{local} completions per generation batch do not split into groups of "
                        f"num_generations={batch['group']}", field="training.per_device_train_batch_size",
                        fix="make per_device_train_batch_size x steps_per_generation a multiple of "
                            "num_generations")


def check_generation_engine(trl_config: dict, plugins) -> None:
    """The generation engine (TRL's ``use_vllm``), checked before anything loads: vLLM installed, a CUDA
    device, no sampler plugin that would replace it, no vLLM option without it."""
    if not trl_config.get("use_vllm"):
        stray = sorted(k for k in trl_config if k.startswith("vllm_"))
        if stray:
            raise UserError(f"{', '.join(stray)} {'has' if len(stray) == 1 else 'have'} no effect without use_vllm: "
                            "true", field=f"training.{stray[0]}",
                            fix="add training.use_vllm: true (on a CUDA machine with vllm installed), or remove it")
        return
    if importlib.util.find_spec("vllm") is None:
        raise UserError("use_vllm needs the vllm package, which is not installed", field="training.use_vllm",
                        fix="pip install vllm (a version matching your torch) on a CUDA machine, or remove "
                            "training.use_vllm to generate with transformers")
    import torch  # only here: vLLM itself imports torch, and the check needs it

    if not torch.cuda.is_available():
        raise UserError("use_vllm needs a CUDA GPU, and this machine has none", field="training.use_vllm",
                        fix="remove training.use_vllm to generate with transformers, or run on a GPU machine")
    samplers = plugins.implementers("posttrain_sample")
    if samplers:
        raise UserError(f"plugin '{samplers[0]}' produces the rollouts (posttrain_sample), so vLLM would never "
                        "generate", field="training.use_vllm",
                        fix=f"remove training.use_vllm, or disable '{samplers[0]}'")
    mode = trl_config.get("vllm_mode", "colocate")
    if mode not in ("colocate", "server"):
        raise UserError(f"vllm_mode must be 'colocate' or 'server', got {mode!r}", field="training.vllm_mode",
                        fix="use colocate (vLLM shares this GPU) or server (a `trl vllm-serve` process)")


STAGE = OnlineStage()
