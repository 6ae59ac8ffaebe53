"""``stage: iterative``: iterative DPO, rounds of sampling from the policy, scoring, pairing and DPO, the
reference updated per round, on TRL's DPOTrainer (``posttrain.trainers.iterative``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from ..errors import UserError
from ..stage import MemoryFacts, Panel, Stage, StageResult
from .preference import LOSS_MANAGED, PAIR_HOOKS, PAIR_RENAMED, PreferenceStage


@dataclass
class Sampling:
    """How samples are drawn from the policy (the iterative and rejection_sampling stages)."""

    samples: int = field(default=4, metadata={
        "help": "Completions sampled per prompt (k; Llama 3's rejection sampling used 10-30)."})
    prompts: Union[int, None] = field(default=64, metadata={
        "help": "Prompts per round (iterative) or in all (rejection_sampling), drawn without repeats from the "
                "training prompts; null: all of them."})
    max_new_tokens: int = field(default=64, metadata={"help": "Length limit of a sample."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generation batch."})

    def validate(self):
        for name in ("samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.prompts is not None and self.prompts < 1:
            raise ValueError(f"prompts must be at least 1 (or null for all), got {self.prompts}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class PairSampling(Sampling):
    def validate(self):
        super().validate()
        if self.samples < 2:
            raise ValueError("samples must be at least 2: a pair needs two samples of a prompt")


class IterativeStage(Stage):
    name = "iterative"
    about = ("iterative DPO: rounds of sampling from the policy, scoring, pairing and DPO, the reference updated per "
             "round")
    trainer = "trl.DPOTrainer"
    config = PreferenceStage.config
    layouts = (("prompt",),)
    generates = True
    default_plugins = {"dpo": {}}
    managed = {**LOSS_MANAGED,
               "precompute_ref_log_probs": "each round trains on new pairs, and the reference may move between "
                                           "rounds: its log-probs are computed as training goes"}
    renamed = PAIR_RENAMED
    hooks = (*PAIR_HOOKS, "posttrain_select_pair")
    required_hooks = ("posttrain_preference_loss", "posttrain_reward")
    pipeline_keys = ("rounds",)
    resumes_longer = False  # training.max_steps and num_train_epochs are each round's: a resume keeps them
    panels = (Panel("loss", "training loss (DPO, rounds one after another)", ("loss",)),
              Panel("sample_reward", "mean reward of the round's samples", ("sample_mean_reward",), "rounds"),
              Panel("pairs", "pairs kept per round", ("pairs",), "rounds"),
              Panel("round_accuracy", "greedy answer accuracy after each round (held out)",
                    ("answers.answer_accuracy",), "rounds"))

    @dataclass
    class Options:
        rounds: int = field(default=3, metadata={"help": "iterative stage: the number of rounds."})
        sampling: PairSampling = field(default_factory=PairSampling, metadata={
            "help": "iterative stage: how each round's samples are drawn from the policy."})

        def validate(self):
            if self.rounds < 1:
                raise ValueError(f"rounds must be at least 1, got {self.rounds}")

    def check(self, plan) -> None:
        """Each round's DPO trains on that round's pairs, which have no held-out split: the held-out prompts are
        answered after every round instead (``rounds`` in summary.json)."""
        cfg = plan.trl_config
        for key in ("eval_strategy", "eval_on_start"):
            if cfg.get(key) not in (None, False, "no"):
                raise UserError("the iterative stage does not evaluate during a round's training: the held-out "
                                "prompts are answered greedily after every round", field=f"training.{key}",
                                fix=f"remove training.{key} (each round's answers are in summary.json's rounds)")

    def memory(self, cfg, plugins, recipe, *, prompt_length, max_positions, processes) -> MemoryFacts:
        facts = PreferenceStage.memory(self, cfg, plugins, recipe, prompt_length=prompt_length,
                                       max_positions=max_positions, processes=processes)
        # each round samples between trainings (no gradients held): a batch of prompts x samples at once, with
        # the policy gathered under ZeRO-3 (trainers.evaluation.generation_model)
        sampling = recipe.stage_options.sampling
        facts.generation_rows = sampling.batch_size * sampling.samples
        facts.completion_len = sampling.max_new_tokens
        facts.prompt_len = prompt_length if prompt_length is not None else max(1, facts.seq_len - sampling.max_new_tokens)
        facts.notes.append(f"iterative: sampling {sampling.batch_size} prompts x {sampling.samples} samples at once"
                           + ("" if prompt_length is not None else
                              f", prompts assumed {facts.prompt_len} tokens (max_length - max_new_tokens); give "
                              "--prompt-length for yours"))
        return facts

    def run(self, plan, run_dir: Path, resume: bool) -> StageResult:
        from ..trainers.iterative import run

        return StageResult(run(plan, run_dir, resume), model=None)


STAGE = IterativeStage()
