"""``stage: rejection_sampling``: sample completions, score them, keep each prompt's best as an SFT dataset
for the next stage (``posttrain.trainers.rejection_sampling``). Nothing is trained."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from ..stage import Panel, Stage, StageResult
from .iterative import Sampling

DATASET_FILE = "dataset.jsonl"


@dataclass
class BestOfSampling(Sampling):
    min_score: Union[float, None] = field(default=None, metadata={
        "help": "Keep a prompt's best sample only if its reward is at least this."})


class RejectionSamplingStage(Stage):
    name = "rejection_sampling"
    about = "sample completions, score them, keep each prompt's best as an SFT dataset for the next stage"
    trainer = "none (sampling and scoring only)"
    config = None
    layouts = (("prompt",),)
    generates = True
    hooks = ("posttrain_required_columns", "posttrain_check_record", "posttrain_transform_dataset", "posttrain_sample",
             "posttrain_reward")
    required_hooks = ("posttrain_reward",)
    pipeline_keys = ("kept", "best_rewards")
    panels = (Panel("kept", "prompts kept (best sample at least min_score)", ("kept",), "summary"),
              Panel("best_reward", "mean reward of each prompt's best sample", ("best_rewards.mean",), "summary"))

    @dataclass
    class Options:
        sampling: BestOfSampling = field(default_factory=BestOfSampling, metadata={
            "help": "rejection_sampling stage: how the samples are drawn, and the best one's minimum reward."})

    def run(self, plan, run_dir: Path, resume: bool) -> StageResult:
        from ..trainers.rejection_sampling import run

        summary = run(plan, run_dir, resume, self.dataset(run_dir))
        return StageResult(summary, model=Path(summary["model"]), dataset=self.dataset(run_dir))

    def output(self, run_dir: Path, recipe, result=None) -> Path:
        """Nothing is trained: the output is the model the stage sampled from."""
        summary = run_dir / "summary.json"
        return Path(json.loads(summary.read_text())["model"]) if summary.is_file() else run_dir / "model"

    def dataset(self, run_dir: Path) -> Path:
        return run_dir / DATASET_FILE

    def finished(self, run_dir: Path, recipe) -> bool:
        return (run_dir / "summary.json").is_file() and self.dataset(run_dir).is_file()


STAGE = RejectionSamplingStage()
