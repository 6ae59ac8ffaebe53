"""The base of the stages that train one run of one TRL trainer (sft, reward_model, preference, kto, online):
such a stage names its module of ``posttrain.trainers`` and inherits :meth:`TrainerStage.run`, which hands
that module to ``posttrain.trainers.run.run_training``. It lives among the stages, not in the contract
(``posttrain.stage``), because its run imports the trainers, a layer above the contract."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import ClassVar

from ..stage import Stage, StageResult


class TrainerStage(Stage):
    """A stage on one TRL trainer: set ``trainer_module`` instead of writing ``run``."""

    trainer_module: ClassVar[str] = ""  # its module of posttrain.trainers ("preference": posttrain.trainers.preference)

    def run(self, plan, run_dir: Path, resume: bool) -> StageResult:
        from ..trainers.run import run_training

        module = importlib.import_module(f"..trainers.{self.trainer_module}", __package__)
        return StageResult(run_training(self, module, plan, run_dir, resume), model=None)
