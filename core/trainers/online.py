"""The online stage: prompts in, the policy trained by RL on its own completions scored by the reward
plugins, on ``OnlineTrainer``: TRL's own GRPOTrainer, with rollouts, rewards, advantages and reference
updates taken from hooks.

What is TRL's: the data loader that repeats each prompt ``num_generations`` times, generation
(transformers or vLLM), the policy/reference log-prob passes (with LoRA, the reference is the
adapter-disabled model, or the ``ref`` adapter when one exists), the clipped policy loss and its
variants (``loss_type``), the KL penalty (``beta``), multiple iterations per batch, checkpointing,
logging. What is ours, through four small overrides:

- reward sources: each enabled ``posttrain_reward`` plugin (a reward function named in the recipe
  included) is one of TRL's reward functions, with its ``weight`` as TRL's reward weight (so TRL logs
  each source's mean and std, and a source returning None abstains);
- advantages: TRL computes advantages inline in ``_generate_and_score_completions`` (there is no
  narrower override point). We let it, then replace them with the output of the
  ``posttrain_advantage_estimate`` owner passed through the ``posttrain_advantage_transform``
  chain, computed from the same gathered rewards TRL used;
- rollouts: when a plugin owns ``posttrain_sample``, completions come from it instead of TRL's
  generation;
- reference updates: ``posttrain_update_reference`` after every optimizer step.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
import torch
from transformers import Trainer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.models import unwrap_model_for_generation

from ..errors import UserError
from ..models import load_frozen_model, resolve_model_path
from ..errors import contract_error
from ..plugin_set import PluginSet
from ..seams import grpo_logger_name, reference_builder
from ..rewards import RewardSource, source_weight
from ..types import Advantages, Rollouts
from ..validate import Plan
from .callbacks import ReferenceUpdateCallback
from .config import build_config
from .evaluation import answer_metrics
from .guard import GuardedTrainer
from . import refill
from .parts import finish_trainer, trainer_parts


class _NoAbstentionWarning(logging.Filter):
    """Drops TRL's warning for rows on which every reward function returned None: abstaining is part of
    the reward hook's contract here, and the share of such rows is logged as ``rewards/unscored``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "All reward functions returned None" not in str(record.msg)  # accelerate prefixes "[RANK n] "


logging.getLogger(grpo_logger_name()).addFilter(_NoAbstentionWarning())


class CriticStepCallback(TrainerCallback):
    """Steps the critic's optimizer after each of the policy's optimizer steps."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        critic = self.trainer.critic
        critic.step()
        norm = getattr(critic, "last_grad_norm", None)
        if norm is not None:
            self.trainer._metrics["train"]["critic/grad_norm"].append(norm)


_FIT_TERMS = ("n", "g", "g2", "e", "e2", "v", "n_last", "g_last", "g2_last", "e_last", "e2_last")


def value_fit_sums(values, targets, completion_mask):
    """Sufficient statistics of how the values V fit the returns G on the valid completion tokens (those
    with a target), overall and at each completion's last token: counts and sums of G, G², G − V, (G − V)²
    and V, as one vector that sums over processes."""
    valid = completion_mask.bool() & ~torch.isnan(targets)
    g = torch.nan_to_num(targets.float(), nan=0.0)
    v = values.float()
    e = (g - v) * valid
    g, v = g * valid, v * valid
    lengths = completion_mask.long().sum(1)
    rows = torch.nonzero((lengths > 0) & valid.any(1)).flatten()
    last = (lengths[rows] - 1).clamp(min=0)
    g_last, e_last = g[rows, last], e[rows, last]
    return torch.stack([valid.sum().float(), g.sum(), (g * g).sum(), e.sum(), (e * e).sum(), v.sum(),
                        torch.tensor(float(len(rows)), device=g.device), g_last.sum(), (g_last * g_last).sum(),
                        e_last.sum(), (e_last * e_last).sum()])


def value_fit(sums) -> dict:
    """Explained variance of the returns by the values, 1 − Var(G − V) / Var(G) (1: a perfect critic, 0: no
    better than a constant, below 0: worse), overall and at the last token, and the mean value and return."""
    t = dict(zip(_FIT_TERMS, sums.tolist(), strict=True))

    def explained(n, g, g2, e, e2):
        if n < 2:
            return None
        var_g = g2 / n - (g / n) ** 2
        var_e = e2 / n - (e / n) ** 2
        return None if var_g <= 1e-12 else 1.0 - var_e / var_g

    n = max(t["n"], 1.0)
    return {
        "values_mean": t["v"] / n,
        "returns_mean": t["g"] / n,
        "explained_variance": explained(t["n"], t["g"], t["g2"], t["e"], t["e2"]),
        "explained_variance_last": explained(t["n_last"], t["g_last"], t["g2_last"], t["e_last"], t["e2_last"]),
    }


class OnlineTrainer(GuardedTrainer, GRPOTrainer):
    """``trl.GRPOTrainer`` whose reward sources, advantage estimate and transforms, sampler and
    reference updates come from the enabled plugins."""

    def __init__(self, *args, plugins: PluginSet, stage: str = "online", reference=False, **kwargs):
        """``reference``: how the frozen reference copy of full fine-tuning is built when ``beta`` > 0, a
        callable returning the model (posttrain loads it in the compute dtype); ``False`` leaves it to TRL."""
        self.plugins = plugins
        self.stage = stage
        self.plan: Plan | None = None  # set by build_trainer: what evaluate() answers and scores with
        sources = plugins.implementers("posttrain_reward")
        config = kwargs["args"]
        config.reward_weights = [source_weight(plugins, name) for name in sources]
        self.samples_from_plugin = bool(plugins.implementers("posttrain_sample"))
        self._scored = None
        self._rollout_prompts: list = []
        reward_funcs = [RewardSource(plugins, name) for name in sources]
        with reference_builder("grpo_trainer", reference):
            super().__init__(*args, reward_funcs=reward_funcs, **kwargs)
        for source in reward_funcs:  # a completion not ending with one of these was cut (TRL's clipped_ratio)
            source.stop_ids = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        if plugins.implementers("posttrain_update_reference"):
            self.add_callback(ReferenceUpdateCallback(self))
        self.critic = plugins.call("posttrain_critic", stage=stage)  # set up by finish_trainer (needs precision)
        self._kl_in_reward = False  # set when the advantage estimator folds the KL into the reward
        owner = plugins.implementers("posttrain_advantage_estimate")
        self._estimator_reads_tokens = bool(owner) and type(plugins.by_name[owner[0]]).reads_per_token_logps
        if self.critic is not None:
            self.add_callback(CriticStepCallback(self))

    def setup_critic(self) -> None:
        if self.critic is not None:
            self.critic.setup(self)

    # -- evaluation during training -----------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """posttrain's evaluation of the policy, where transformers evaluates (``eval_strategy``, ``eval_steps``,
        ``eval_delay``, ``eval_on_start``): the greedy answers to ``eval.generate`` held-out prompts
        (``eval.max_new_tokens`` each), scored by the reward sources, as the run's held-out summary scores them,
        instead of TRL's evaluation (sampled groups of every held-out prompt, and the loss). One line of
        metrics.jsonl at the step: ``eval_reward`` (the mean weighted total), ``eval_answer_accuracy`` (the share
        of answers with a positive total), ``eval_rewards/<source>/mean``, ``eval_runtime``; trackers show them
        as ``eval/...``. Returned as transformers returns its metrics (``metric_for_best_model`` may name them)."""
        started = time.time()
        heldout = self.eval_dataset if eval_dataset is None else eval_dataset
        answers = answer_metrics(self.plan, self, heldout) if self.plan is not None else None
        metrics = {}
        if answers is not None:
            metrics[f"{metric_key_prefix}_reward"] = answers["mean_reward"]
            metrics[f"{metric_key_prefix}_answer_accuracy"] = answers["answer_accuracy"]
            metrics.update({f"{metric_key_prefix}_rewards/{name}/mean": value
                            for name, value in answers["by_source"].items()})
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - started, 4)
        Trainer.log(self, dict(metrics))  # not GRPOTrainer.log: it would add (and clear) the training metrics
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -- rewards and advantages ---------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._scored = (rewards_per_func, prompts, completions)  # gathered over processes, (N, sources)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        if mode == "train" and self.plugins.implementers("posttrain_filter_groups"):
            output, (rewards_per_func, prompts, completions) = self._sample_kept_groups(inputs)
        else:
            output = super()._generate_and_score_completions(inputs)
            rewards_per_func, prompts, completions = self._scored
        self._scored = None
        rollouts = self.rollouts(rewards_per_func, prompts, completions, output["completion_mask"], mode)
        if self.critic is not None or self._estimator_reads_tokens:
            self._add_per_token_terms(rollouts, output)
        estimate = self.advantages(rollouts)
        advantages = estimate.advantages
        output["advantages"] = advantages if advantages.dim() == 2 else advantages[rollouts.local]
        self._kl_in_reward = estimate.kl_in_reward
        if self.critic is not None:
            if estimate.value_targets is None:
                owner = self.plugins.implementers("posttrain_advantage_estimate")[0]
                raise UserError(f"the critic needs value targets, and the advantage estimator '{owner}' gives none",
                                field=f"plugins.{owner}", fix="use the gae estimator with the critic")
            output["value_targets"] = estimate.value_targets
            output["old_values"] = rollouts.values
            sums = value_fit_sums(rollouts.values, estimate.value_targets, rollouts.completion_mask)
            for key, value in value_fit(self.accelerator.gather(sums.reshape(1, -1)).sum(0)).items():
                if value is not None:  # explained variance of returns that do not vary is undefined
                    self._metrics[mode][f"critic/{key}"].append(value)
        if estimate.kl_in_reward and rollouts.ref_logps is not None:
            kl = ((rollouts.logps - rollouts.ref_logps) * rollouts.completion_mask).sum() / \
                rollouts.completion_mask.sum().clamp(min=1)
            self._metrics[mode]["kl_in_reward"].append(self.accelerator.gather(kl.reshape(1)).mean().item())

        # TRL logged its own advantages for the completions table: log ours instead.
        logged = advantages if advantages.dim() == 1 else self.accelerator.gather(
            (advantages * rollouts.completion_mask).sum(1) / rollouts.completion_mask.sum(1).clamp(min=1))
        table = self._logs["advantages"]
        for _ in range(min(len(logged), len(table))):
            table.pop()
        table.extend(logged.tolist())
        metrics = self._metrics[mode]
        metrics["advantages/mean"].append(logged.mean().item())
        metrics["advantages/std"].append(logged.std().item() if logged.numel() > 1 else 0.0)
        metrics["advantages/abs_mean"].append(logged.abs().mean().item())
        # completions no source scored (every one abstained): advantage 0, so only the KL term (beta > 0)
        # trains on them. TRL warns once per such batch with a whole example; this share replaces it.
        metrics["rewards/unscored"].append(torch.isnan(rollouts.rewards).float().mean().item())
        return output

    # -- groups dropped and refilled (posttrain_filter_groups) ------------------------------------

    def _sample_kept_groups(self, inputs):
        """Sample, score and filter rounds of generation batches until every process has its share of kept
        groups or the plugins' round limit is reached, and assemble the batch (``refill``). Returns the
        generation output and the (gathered rewards, local prompts, local completions) of the assembled
        batch. TRL's generation metrics (reward, lengths...) are logged for every round sampled."""
        g, processes, n = self.num_generations, self.accelerator.num_processes, len(inputs)
        outputs, scored, verdicts = [], [], []
        batch, limit = inputs, None
        while True:
            outputs.append(super()._generate_and_score_completions(batch))
            if len(outputs) == 1 and refill.unsupported_keys(outputs[0]):
                raise UserError(f"a generation batch with {', '.join(refill.unsupported_keys(outputs[0]))} cannot "
                                "be refilled group by group",
                                field=f"plugins.{self.plugins.implementers('posttrain_filter_groups')[0]}",
                                fix="disable the group filter for inputs other than text")
            scored.append(self._scored)
            rewards_per_func, prompts, completions = self._scored
            rollouts = self.rollouts(rewards_per_func, prompts, completions, outputs[-1]["completion_mask"])
            keep, rounds = self._filter_groups(rollouts)
            verdicts.append(keep)
            limit = rounds if limit is None else min(limit, rounds)
            if not refill.short(verdicts, processes) or len(outputs) > limit:
                break
            batch = self._refill_prompts(n, len(outputs))
        chosen = refill.picks(verdicts, processes)
        mine = chosen[self.accelerator.process_index]
        output = refill.assemble(outputs, mine, g, self._tokenizer.pad_token_id)
        loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
        output["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        output["advantages"] = torch.zeros(n, device=output["completion_mask"].device)
        rows = refill.gathered_rows(chosen, g, n // g)
        rewards = torch.stack([scored[r][0][i] for r, i in rows])
        prompts = refill.local_items([s[1] for s in scored], mine, g)
        completions = refill.local_items([s[2] for s in scored], mine, g)
        self._log_refill(verdicts, processes, len(outputs), n)
        if len(outputs) > 1:
            self._rewrite_completion_table(prompts, completions, rewards)
        return output, (rewards, prompts, completions)

    def _filter_groups(self, rollouts: Rollouts) -> tuple[list[bool], int]:
        """The groups every filter keeps, and the smallest round limit of those that answered."""
        groups = rollouts.rewards.shape[0] // rollouts.group_size
        keep, limit = [True] * groups, None
        for name, result in self.plugins.call_each("posttrain_filter_groups", rollouts=rollouts):
            if result is None:
                continue
            verdict = [bool(k) for k in result.keep]
            if len(verdict) != groups or not isinstance(result.max_rounds, int) or result.max_rounds < 0:
                raise contract_error(name, "posttrain_filter_groups", result,
                                     f"a GroupFilter with {groups} keep flags (one per group) and max_rounds >= 0")
            keep = [a and b for a, b in zip(keep, verdict, strict=True)]
            limit = result.max_rounds if limit is None else min(limit, result.max_rounds)
        return keep, (0 if limit is None else limit)

    def _refill_prompts(self, n: int, round_: int) -> list[dict]:
        """This process's rows of a new generation batch: prompts drawn from the training set, each repeated
        num_generations times. The draw depends only on the seed, the step and the round, so every process
        draws the same prompts (taking its own share) and a resumed run draws what the uninterrupted one did."""
        g, processes = self.num_generations, self.accelerator.num_processes
        groups = n // g * processes
        rng = random.Random(f"{self.args.seed}/{self.state.global_step}/{round_}")
        size = len(self.train_dataset)
        drawn = rng.sample(range(size), groups) if groups <= size else rng.choices(range(size), k=groups)
        mine = drawn[self.accelerator.process_index * (n // g):(self.accelerator.process_index + 1) * (n // g)]
        return [self.train_dataset[i] for i in mine for _ in range(g)]

    def _log_refill(self, verdicts, processes: int, rounds: int, n: int) -> None:
        per_process = n // self.num_generations
        metrics = self._metrics["train"]
        # counts over every process's assembled groups, computed from the gathered verdicts (no communication)
        total_kept = sum(min(c, per_process) for c in refill.kept_counts(verdicts, processes))
        groups = per_process * processes
        metrics["filter_groups/kept"].append(float(total_kept))
        metrics["filter_groups/dropped"].append(float(sum(not k for v in verdicts for k in v)))
        metrics["filter_groups/filled_with_dropped"].append(float(groups - total_kept))
        metrics["filter_groups/rounds"].append(float(rounds))
        metrics["filter_groups/extra_completions"].append(float((rounds - 1) * groups * self.num_generations))

    def _rewrite_completion_table(self, prompts, completions, rewards) -> None:
        """TRL's completions table (log_completions) holds the last round sampled: make it the batch trained on."""
        from accelerate.utils import gather_object

        table = self._logs
        for column in (table["prompt"], table["completion"], table["advantages"], table["images"]):
            column.clear()
        for column in (*table["rewards"].values(), *table["extra"].values()):
            column.clear()
        table["prompt"].extend(gather_object(prompts))
        table["completion"].extend(gather_object(completions))
        for i, name in enumerate(self.reward_func_names):
            table["rewards"][name].extend(rewards[:, i].tolist())
        table["advantages"].extend([0.0] * rewards.shape[0])  # replaced by the advantages once computed

    def rollouts(self, rewards_per_func, prompts, completions, completion_mask, mode: str = "train") -> Rollouts:
        """The scored batch as the advantage hooks see it: rewards combined by weight (NaN where every
        source abstained), each source's rewards, the group size and this process's rows."""
        weights = self.reward_weights.to(rewards_per_func.device)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable] = torch.nan
        n, rank = len(prompts), self.accelerator.process_index
        return Rollouts(
            rewards=rewards,
            rewards_by_source={name: rewards_per_func[:, i] for i, name in enumerate(self.reward_func_names)},
            group_size=self.num_generations if mode == "train" else self.num_generations_eval,
            completion_mask=completion_mask,
            local=slice(rank * n, (rank + 1) * n),
            prompts=list(prompts),
            completions=list(completions),
            training=mode == "train",
            gather=self.accelerator.gather,
        )

    def _add_per_token_terms(self, rollouts: Rollouts, output: dict) -> None:
        """What a per-token estimator reads: the policy's log-probs at sampling time and the reference's
        (TRL computed those with beta > 0), and the critic's values when there is a critic, per completion
        token."""
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        keep = output["completion_ids"].size(1)
        completion_mask = output["completion_mask"].to(torch.float32)
        logps = output.get("old_per_token_logps")
        if logps is None:
            with torch.no_grad():
                logps = self._get_per_token_logps_and_entropies(self.model, ids, mask, keep,
                                                                self.args.per_device_train_batch_size)[0]
        rollouts.logps = logps.detach() * completion_mask
        ref = output.get("ref_per_token_logps")
        rollouts.ref_logps = None if ref is None else ref.detach() * completion_mask
        rollouts.kl_coef = float(self.args.beta)
        if self.critic is not None:
            rollouts.values = self.critic.values(ids, mask, keep) * completion_mask

    def advantages(self, rollouts: Rollouts) -> Advantages:
        """Estimate (one owner), then transform (chained); unscorable rows end at 0."""
        owner = self.plugins.implementers("posttrain_advantage_estimate")[0]
        estimate = self.plugins.call("posttrain_advantage_estimate", rollouts=rollouts)
        if not isinstance(estimate, Advantages):
            estimate = Advantages(estimate)
        advantages = estimate.advantages
        self._check_shape(advantages, rollouts, owner)
        if estimate.value_targets is not None and tuple(estimate.value_targets.shape) != tuple(
                rollouts.completion_mask.shape):
            raise contract_error(owner, "posttrain_advantage_estimate", estimate.value_targets,
                                 f"value_targets of shape {tuple(rollouts.completion_mask.shape)}")
        advantages, _ = self.plugins.chain(
            "posttrain_advantage_transform", "advantages", advantages, rollouts=rollouts,
            on_step=lambda name, before, after, note: self._check_shape(after, rollouts, name))
        estimate.advantages = torch.nan_to_num(advantages.to(torch.float32), nan=0.0)
        return estimate

    # -- the loss, and the critic -------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if self._kl_in_reward and self.beta != 0.0:
            # the estimator put beta * KL into the reward: TRL's own in-loss KL term would count it twice
            beta, self.beta = self.beta, 0.0
            try:
                loss = super()._compute_loss(model, inputs)
            finally:
                self.beta = beta
        else:
            loss = super()._compute_loss(model, inputs)
        if self.critic is not None and self.model.training and "value_targets" in inputs:
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            metrics = self.critic.train_on(ids, mask, inputs["completion_ids"].size(1), inputs["value_targets"],
                                           inputs["old_values"], inputs["completion_mask"],
                                           scale=1.0 / self.current_gradient_accumulation_steps)
            self._finite_guard().add_loss(metrics["critic/value_loss"])
            for key, value in metrics.items():
                self._metrics["train"][key].append(self.accelerator.gather(value.reshape(1).float()).mean().item())
        return loss

    def _save_extra(self, folder: Path) -> None:
        if self.critic is not None:  # on every process: a DeepSpeed critic saves a shard per process
            self.critic.save(folder)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.critic is not None and checkpoint is not None:
            self.critic.load(checkpoint)

    @staticmethod
    def _check_shape(advantages, rollouts: Rollouts, plugin: str) -> None:
        per_sequence = (rollouts.rewards.shape[0],)
        per_token = tuple(rollouts.completion_mask.shape)
        shape = tuple(getattr(advantages, "shape", ()))
        if not isinstance(advantages, torch.Tensor) or shape not in (per_sequence, per_token):
            raise UserError(
                f"plugin '{plugin}' returned advantages of shape {shape or type(advantages).__name__}; expected a "
                f"tensor of shape {per_sequence} (one per completion of the gathered batch) or {per_token} "
                f"(per token of this process's completions)", field=f"plugins.{plugin}",
                fix="report this to the plugin's author")

    # -- rollouts from a sampler plugin --------------------------------------------------------

    def _generate(self, prompts: list):
        self._rollout_prompts = prompts
        return super()._generate(prompts)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if not self.samples_from_plugin:
            # TRL's transformers generation runs without autocast: with float32 master weights it would
            # generate in float32. Autocast makes it run in the compute dtype, as training does.
            with self.accelerator.autocast():
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
        generation = {"max_new_tokens": self.max_completion_length, "do_sample": True,
                      "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                      "min_p": self.min_p, "repetition_penalty": self.repetition_penalty}
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        ) as model, torch.no_grad(), self.accelerator.autocast():
            samples = self.plugins.call("posttrain_sample", model=model, tokenizer=self.processing_class,
                                        prompts=self._rollout_prompts, num_samples=1, generation=generation)
        owner = self.plugins.implementers("posttrain_sample")[0]
        if samples is None or len(samples) != len(prompt_ids) or any(len(s) != 1 for s in samples):
            raise UserError(f"plugin '{owner}' returned {len(samples or [])} sample lists for {len(prompt_ids)} "
                            "prompts; expected one list of one completion per prompt", field=f"plugins.{owner}",
                            fix="report this to the plugin's author")
        return [self._completion_ids(s[0]) for s in samples], None

    def _completion_ids(self, text: str) -> list[int]:
        """Token ids of a sampled completion: no special tokens added, cut at max_completion_length,
        ended with EOS unless cut."""
        ids = self._tokenizer(str(text), add_special_tokens=False)["input_ids"][: self.max_completion_length]
        return ids + [self._tokenizer.eos_token_id] if len(ids) < self.max_completion_length else ids


# -- the stage ---------------------------------------------------------------------------------

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
    """The reward curve (the mean combined reward and each source's, per logged step), and where the critic
    has an engine of its own, what that engine holds on the main process."""
    facts = trainer.critic.engine_facts() if trainer.critic is not None else None
    return {**_reward_curve(trainer), **({"critic_engine": facts} if facts else {})}


def _reward_curve(trainer) -> dict:
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

    def mean(points):  # steps on which every completion abstained have no reward (None)
        scored = [p["reward"] for p in points if p["reward"] is not None]
        return sum(scored) / len(scored) if scored else None

    return {
        "reward_curve": curve,
        "reward_first_third": mean(curve[:third]),
        "reward_last_third": mean(curve[-third:]),
    }


def build_trainer(plan: Plan, run_dir: Path):
    recipe = plan.recipe
    p = trainer_parts(plan, run_dir, config=lambda precision: online_config(plan, run_dir, precision))
    reference = resolve_model_path(recipe.model.reference or recipe.model.name_or_path)
    # the held-out prompts are the eval_dataset: evaluate() answers them (eval_strategy, eval_on_start)
    trainer = OnlineTrainer(model=p.model, args=p.config, train_dataset=p.train, eval_dataset=p.heldout,
                            processing_class=p.tokenizer, peft_config=p.peft_config,
                            reference=lambda: load_frozen_model(recipe, reference, p.precision),
                            callbacks=p.callbacks, plugins=plan.plugins, stage=STAGE)
    trainer.plan = plan
    trainer = finish_trainer(trainer, p.precision)
    trainer.setup_critic()
    return trainer, p.heldout


def online_config(plan: Plan, run_dir: Path, precision):
    """The GRPOConfig of the run. GRPOConfig refuses num_generations < 2 (GRPO's baseline is the group);
    with a critic the baseline is the value function, so one completion per prompt is allowed: the
    config is built with a group that divides the generation batch, then set to 1. GRPOTrainer itself
    handles groups of one (its sampler repeats each prompt once; its evaluation path already does)."""
    from ..trl_fields import config_defaults
    from ..validate import online_batch

    defaults = ONLINE_DEFAULTS
    if plan.trl_config.get("num_generations_eval") is None:
        # GRPOConfig checks the eval batch against the groups of TRL's sampled evaluation, which the online
        # stage replaces (OnlineTrainer.evaluate answers each held-out prompt once, greedily)
        defaults = {**ONLINE_DEFAULTS, "num_generations_eval": 1}
    single = plan.trl_config.get("num_generations") == 1
    if not single:
        return build_config(GRPOConfig, plan, run_dir, precision, defaults)
    batch = online_batch(plan.trl_config, config_defaults(plan.stage.config))["generation_batch"]
    group = next(d for d in range(2, batch + 1) if batch % d == 0)
    values = {**plan.trl_config, "num_generations": group}
    config = build_config(GRPOConfig, Plan(plan.recipe, plan.plugins, values), run_dir, precision, defaults)
    config.num_generations = 1
    return config
