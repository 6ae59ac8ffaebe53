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


class AcmeUnmarked(Plugin):
    name = "acme_unmarked"
    description = "a reward whose method lacks @hookimpl (a common slip)"

    def posttrain_reward(self, completions):
        return [1.0 for _ in completions]


class AcmeHooks(Plugin):
    """Implements the batching and reference-update hooks and records that they ran."""

    name = "acme_hooks"
    description = "records calls to the batching and reference hooks; drops each response's first token"
    calls: dict = {}

    def _seen(self, hook):
        AcmeHooks.calls[hook] = AcmeHooks.calls.get(hook, 0) + 1

    @hookimpl
    def posttrain_transform_dataset(self, dataset, split):
        self._seen(f"transform_dataset:{split}")
        return dataset.select(range(len(dataset) - 1))  # drop one example, visibly

    @hookimpl
    def posttrain_token_mask(self, completion_mask):

        self._seen("token_mask")
        first = (completion_mask.cumsum(dim=1) == 1) & (completion_mask == 1)
        return (~first).to(completion_mask.dtype)

    @hookimpl
    def posttrain_step_metrics(self, logps):
        return {"acme/chosen_len": float(logps.chosen_lengths.float().mean())}

    @hookimpl
    def posttrain_data_collator(self, default):
        self._seen("data_collator")

        def collate(examples):
            AcmeHooks.calls["collate"] = AcmeHooks.calls.get("collate", 0) + 1
            return default(examples)

        return collate

    @hookimpl
    def posttrain_train_sampler(self, dataset, seed):
        import torch

        self._seen("train_sampler")
        return torch.utils.data.SequentialSampler(dataset)

    @hookimpl
    def posttrain_update_reference(self, trainer, event, step):
        self._seen(f"update_reference:{event}")
