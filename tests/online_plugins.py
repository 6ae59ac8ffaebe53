"""Plugins the online-stage tests enable by import path (``online_plugins:Name``): a graded reward
a tiny random model can move, a reward that abstains on some examples, a fixed sampler, and a
per-token advantage estimator (the shape a value-model estimator would return)."""

from dataclasses import dataclass

from posttrain import Plugin, hookimpl
from posttrain.types import completion_text


class DigitShare(Plugin):
    name = "digit_share"
    description = "reward: the share of the completion's characters that are digits"

    @dataclass
    class Options:
        weight: float = 1.0

    @hookimpl
    def posttrain_reward(self, completions):
        texts = [completion_text(c) for c in completions]
        return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


class ScoreWhenAsked(Plugin):
    name = "score_when_asked"
    description = "reward 1 where the example's `score_me` column is true, abstains elsewhere"

    @dataclass
    class Options:
        weight: float = 1.0

    @hookimpl
    def posttrain_reward(self, completions, columns):
        if "score_me" not in columns:
            return None
        return [float(len(completion_text(c)) % 3) if ask else None
                for c, ask in zip(completions, columns["score_me"], strict=True)]


class FixedSampler(Plugin):
    name = "fixed_sampler"
    description = "every rollout is the same text"

    @dataclass
    class Options:
        text: str = "The answer is 42"

    def __init__(self, options=None):
        super().__init__(options)
        self.calls = []

    @hookimpl
    def posttrain_sample(self, model, prompts, num_samples, generation):
        self.calls.append((len(prompts), num_samples, dict(generation), model.training))
        return [[self.options.text] * num_samples for _ in prompts]


class TokenAdvantage(Plugin):
    name = "token_advantage"
    description = "group-relative advantages spread over each completion's tokens, halving along it"

    @hookimpl
    def posttrain_advantage_estimate(self, rollouts):
        import torch

        grouped = rollouts.grouped_rewards
        per_sequence = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).reshape(-1)[rollouts.local]
        mask = rollouts.completion_mask.float()
        decay = 0.5 ** torch.arange(mask.shape[1], dtype=torch.float32, device=mask.device)
        return per_sequence.unsqueeze(1) * decay.unsqueeze(0) * mask


class NanFromStep(Plugin):
    name = "nan_from_step"
    description = "from optimizer step `step` on, the policy's training forward passes produce NaN (a diverging model)"

    @dataclass
    class Options:
        step: int = 3

    @hookimpl
    def posttrain_callbacks(self):
        from transformers import TrainerCallback

        first = self.options.step

        class Poison(TrainerCallback):
            """A forward hook on the model's final norm that turns its output into NaN in passes that build a
            graph (training), from step `first` on; generation and the reference pass (no_grad) stay finite."""

            def __init__(self):
                self.handle = None

            def on_step_begin(self, args, state, control, model=None, **kwargs):
                import torch

                if self.handle is None and state.global_step + 1 >= first:
                    norm = [m for n, m in model.named_modules() if n.endswith("model.norm")][-1]
                    self.handle = norm.register_forward_hook(
                        lambda mod, inp, out: out * float("nan") if torch.is_grad_enabled() else None)

        return [Poison()]


class TupleLoss(Plugin):
    name = "tuple_loss"
    description = "a loss that returns a tuple instead of a PreferenceLoss (a contract violation)"

    @hookimpl
    def posttrain_reference_needed(self):
        return True

    @hookimpl
    def posttrain_preference_loss(self, logps):
        loss = -(logps.chosen_logps - logps.rejected_logps)
        return loss, loss.detach(), loss.detach()


class ScalarLoss(Plugin):
    name = "scalar_loss"
    description = "a loss that returns one number for the batch instead of one per pair"

    @hookimpl
    def posttrain_preference_loss(self, logps):
        from posttrain import PreferenceLoss

        margin = logps.chosen_logps - logps.rejected_logps
        return PreferenceLoss(-margin.mean(), margin.detach(), margin.detach())


class NoDigits(Plugin):
    name = "no_digits"
    description = "token mask: no token that contains a digit is trained on"

    @hookimpl
    def posttrain_token_mask(self, input_ids, completion_mask, tokenizer):
        import torch

        digits = [i for tok, i in tokenizer.get_vocab().items() if any(ch.isdigit() for ch in tok)]
        return (~torch.isin(input_ids, torch.tensor(digits, device=input_ids.device))).long()


class Constant(Plugin):
    name = "constant"
    description = "reward: the same value for every completion"

    @dataclass
    class Options:
        value: float = 1.0

    @hookimpl
    def posttrain_reward(self, completions):
        return [self.options.value for _ in completions]


class KillInRound(Plugin):
    name = "kill_in_round"
    description = "SIGKILLs its own process once, at a training step of a given round of an iterative stage"

    @dataclass
    class Options:
        round: int = 2
        at_step: int = 1
        marker: str = "killed.marker"

    def __init__(self, options=None):
        super().__init__(options)
        self.rounds_done = 0

    @hookimpl
    def posttrain_update_reference(self, event):
        if event == "round":
            self.rounds_done += 1

    @hookimpl
    def posttrain_callbacks(self):
        import os
        import signal
        from pathlib import Path

        from transformers import TrainerCallback

        plugin = self

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                marker = Path(plugin.options.marker)
                if (plugin.rounds_done + 1 == plugin.options.round and state.global_step == plugin.options.at_step
                        and not marker.exists()):
                    marker.write_text("killed")
                    os.kill(os.getpid(), signal.SIGKILL)

        return [Kill()]


class ScoredPerRank(Plugin):
    name = "scored_per_rank"
    description = "the digit-share reward, recording in FOLDER/rank-N.jsonl which prompts each process scored"

    @dataclass
    class Options:
        folder: str = "scored"
        weight: float = 1.0

    @hookimpl
    def posttrain_reward(self, prompts, completions):
        import json
        import os
        from pathlib import Path

        folder = Path(self.options.folder)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"rank-{os.environ.get('RANK', '0')}.jsonl", "a") as f:
            for p in prompts:
                f.write(json.dumps(p) + "\n")
        texts = [completion_text(c) for c in completions]
        return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


# What the group-filter tests read back: every scored round, and the batch the advantage hooks saw.
SCORED_ROUNDS: list = []
ADVANTAGE_BATCHES: list = []


class ConstantOnEvenPrompts(Plugin):
    name = "constant_on_even_prompts"
    description = ("reward: 0 for every completion of a prompt of even length (a group with no signal), the "
                   "completion's digit share otherwise; records every batch it scores")

    @dataclass
    class Options:
        weight: float = 1.0
        everywhere: bool = False  # 0 for every prompt: every group is without signal

    @hookimpl
    def posttrain_reward(self, prompts, completions):
        texts = [completion_text(c) for c in completions]
        rewards = [0.0 if self.options.everywhere or len(str(p)) % 2 == 0
                   else 0.01 + sum(ch.isdigit() for ch in t) / max(1, len(t)) + 0.001 * len(t)
                   for p, t in zip(prompts, texts, strict=True)]
        SCORED_ROUNDS.append(list(zip([str(p) for p in prompts], texts, rewards, strict=True)))
        return rewards


class SeenByAdvantages(Plugin):
    name = "seen_by_advantages"
    description = "advantage transform that changes nothing and records the batch it is given"

    @hookimpl
    def posttrain_advantage_transform(self, rollouts):
        ADVANTAGE_BATCHES.append(list(zip([str(p) for p in rollouts.prompts],
                                          [completion_text(c) for c in rollouts.completions],
                                          rollouts.rewards.tolist(), strict=True)))
        return None


class WrongGroupCount(Plugin):
    name = "wrong_group_count"
    description = "a group filter that answers for one group too many"

    @hookimpl
    def posttrain_filter_groups(self, rollouts):
        from posttrain import GroupFilter

        return GroupFilter(keep=[True] * (rollouts.rewards.shape[0] // rollouts.group_size + 1), max_rounds=1)
