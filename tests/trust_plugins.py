"""Plugins for the plugin-trust tests, enabled by import path (``trust_plugins:Name``): an author's
mistakes (a hook left unmarked beside a marked one, no hook marked at all, the wrong number of
rewards), a sampler that records what it was given, and a hinge loss for the model card."""

from dataclasses import dataclass

from posttrain import Plugin, PreferenceLoss, hookimpl


class HalfMarked(Plugin):
    name = "half_marked"
    description = "a reward source whose posttrain_reward lacks @hookimpl (its trl_config has it)"

    @hookimpl
    def posttrain_trl_config(self, stage):
        return None

    def posttrain_reward(self, completions):  # the mistake: no @hookimpl
        return [1.0] * len(completions)


class Unmarked(Plugin):
    name = "unmarked"
    description = "no hook is marked"

    def posttrain_reward(self, completions):
        return [1.0] * len(completions)


class ShortRewards(Plugin):
    name = "short_rewards"
    description = "returns one reward too few"

    @hookimpl
    def posttrain_reward(self, completions):
        return [1.0] * (len(completions) - 1)


class PromptKinds(Plugin):
    name = "prompt_kinds"
    description = "samples a fixed text and records the type of the prompts it was given"
    seen: list = []

    @hookimpl
    def posttrain_sample(self, prompts, num_samples):
        PromptKinds.seen.append(type(prompts).__name__)
        return [["4"] * num_samples for _ in prompts]


class Hinge(Plugin):
    name = "hinge"
    description = "a hinge preference loss"

    @dataclass
    class Options:
        margin: float = 1.0

    @hookimpl
    def posttrain_preference_loss(self, logps):
        import torch

        margin = logps.chosen_logratios - logps.rejected_logratios
        return PreferenceLoss(torch.relu(self.options.margin - margin), margin.detach(), 0 * margin.detach())


class KeepAll(Plugin):
    name = "keep_all"
    description = "a token mask that keeps every token (to see that a stage calls posttrain_token_mask)"

    @hookimpl
    def posttrain_token_mask(self, completion_mask):
        return completion_mask.bool()


class SignalAt(Plugin):
    name = "signal_at"
    description = "sends this process a real signal when an optimizer step ends (a preemption, a Ctrl-C)"

    @dataclass
    class Options:
        step: int = 3
        signal: str = "SIGTERM"
        times: int = 1  # 2: a second signal right after the first
        rank: int = -1  # -1: every process; else only this rank
        once: str = ""  # a file: signal only if it does not exist yet, and create it (once over several runs)

    @hookimpl
    def posttrain_callbacks(self):
        import os
        import signal

        from transformers import TrainerCallback

        options = self.options

        class Send(TrainerCallback):
            started = None

            def on_train_begin(self, args, state, control, **kwargs):
                self.started = state.global_step  # a run resumed from a checkpoint is not signalled again

            def on_step_end(self, args, state, control, **kwargs):
                rank = int(os.environ.get("RANK", "0"))
                fresh = not self.started
                if fresh and state.global_step == options.step and options.rank in (-1, rank):
                    if options.once:
                        if os.path.exists(options.once):
                            return
                        open(options.once, "w").close()
                    for _ in range(options.times):
                        os.kill(os.getpid(), getattr(signal, options.signal))

        return [Send()]


class BlockCheckpoint(Plugin):
    name = "block_checkpoint"
    description = "puts a file where the checkpoint of a given step will be written, so that saving it fails"

    @dataclass
    class Options:
        step: int = 4

    @hookimpl
    def posttrain_callbacks(self):
        from pathlib import Path

        from transformers import TrainerCallback

        options = self.options

        class Block(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == options.step - 1:
                    Path(args.output_dir, f"checkpoint-{options.step}").write_text("not a folder")

        return [Block()]
