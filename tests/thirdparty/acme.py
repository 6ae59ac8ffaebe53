"""A third-party plugin package used by the tests. It is not part of posttrain: the tests lay it
out as its own installed distribution, `acme-posttrain`, with its own entry points."""

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from posttrain import Plugin, PreferenceLoss, hookimpl


class AcmeMetrics(Plugin):
    name = "acme_metrics"
    description = "counts its own calls and reports them as a metric"

    @dataclass
    class Options:
        label: str = "calls"

    def __init__(self, options=None):
        super().__init__(options)
        self.calls = 0

    @hookimpl
    def posttrain_step_metrics(self, logps):
        self.calls += 1
        return {f"acme/{self.options.label}": float(self.calls)}


class AcmeLoss(Plugin):
    name = "acme_loss"
    description = "a second preference loss (hinge), to collide with dpo"

    @dataclass
    class Options:
        margin: float = 1.0

    @hookimpl
    def posttrain_preference_loss(self, logps):
        import torch

        margin = logps.chosen_logratios - logps.rejected_logratios
        return PreferenceLoss(torch.relu(self.options.margin - margin), margin.detach(), 0 * margin.detach())


class AcmeExplode(Plugin):
    name = "acme_explode"
    description = "raises inside a hook"

    @dataclass
    class Options:
        where: str = "config"

    @hookimpl
    def posttrain_trl_config(self, stage):
        if self.options.where == "config":
            raise RuntimeError("boom in config")
        return None

    @hookimpl
    def posttrain_loss_terms(self, logps):
        if self.options.where == "loss":
            raise RuntimeError("boom in loss terms")
        return None


class AcmeKiller(Plugin):
    name = "acme_killer"
    description = "SIGKILLs its own process once, at a given step (to test --resume)"

    @dataclass
    class Options:
        at_step: int = 3
        marker: str = "killed.marker"

    @hookimpl
    def posttrain_callbacks(self):
        from transformers import TrainerCallback

        options = self.options

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                marker = Path(options.marker)
                if state.global_step == options.at_step and not marker.exists():
                    marker.write_text("killed")
                    os.kill(os.getpid(), signal.SIGKILL)

        return [Kill()]


class AcmeMisnamedHook(Plugin):
    name = "acme_misnamed"
    description = "implements a hook that does not exist"

    @hookimpl
    def posttrain_preference_los(self, logps):
        return None
