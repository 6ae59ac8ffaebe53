"""The iterative stage: iterative DPO (and the sampling-and-scoring that rejection sampling shares).

Each round r = 1..R:

1. **sample** ``sampling.samples`` completions for each of ``sampling.prompts`` training prompts
   from the current policy (the ``posttrain_sample`` owner, or batched ``model.generate``);
2. **score** them with the enabled reward sources (weighted, abstentions respected);
3. **pair** them: for each prompt, the ``posttrain_select_pair`` owner (default: best against
   worst) picks a chosen and a rejected sample; prompts whose samples all abstained, with fewer
   than two scored samples, whose best and worst tie, or that the selection drops are counted;
4. **train** on the pairs with whichever preference loss plugin owns the loss, on
   ``PreferenceTrainer`` (TRL's DPOTrainer; one trainer for every round, its optimizer and
   schedule new each round, its data the round's pairs);
5. **update the reference** through ``posttrain_update_reference`` with ``event="round"``:
   ``ref_to_latest`` (the study: the reference becomes the latest policy), ``ref_ema`` with ``on:
   round``, or none (the reference stays the starting model, π₀).

With LoRA the policy is one adapter trained across the rounds and the reference is the base with
the adapter disabled (π₀) or the ``ref`` adapter that the reference-update plugins keep (no second
copy of the base; the adapter is not merged between rounds, so that π₀ stays free to use). With
full fine-tuning the reference is a frozen copy, moved by the same plugins.

The run directory holds ``round-NN/`` per round: ``samples.jsonl`` (every prompt's samples and
their rewards), ``pairs.jsonl``, the round's checkpoints, ``final/`` (the policy after the round,
with the ``ref`` adapter; with full fine-tuning and a reference-update plugin also
``reference/``) and ``round.json`` (its numbers). ``--resume`` skips finished rounds and resumes
an interrupted one from its checkpoint, reusing its saved samples and pairs.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

from trl import DPOConfig

from ..errors import UserError
from ..models import load_frozen_model, load_model, load_tokenizer, resolve_model_path, run_precision
from ..pairs import best_and_worst
from ..process import distributed_state, is_main
from ..reference import REF_ADAPTER
from ..sampling import derive_seed
from ..validate import Plan
from .callbacks import MetricsWriter, trainer_callbacks
from .config import build_config
from .evaluation import answer_metrics, generation_model, greedy_answers
from .parts import finish_trainer, load_data
from .run import last_checkpoint, raise_if_stopped
from .preference import PreferenceTrainer
from .prompts import limit_prompts
from .rollouts import compute_autocast, read_jsonl, round_prompts, rows_of, sample_and_score, write_jsonl

STAGE = "iterative"
ADAPTER_FILE = "adapter_model.safetensors"  # a saved LoRA adapter's weights, in its folder


def load_tensors(path: Path) -> dict:
    """A saved state dict: the ``.safetensors`` file ``path``, or every ``*.safetensors`` file in the folder
    ``path`` (a model saved in shards), read in name order into one dict."""
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(path)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def round_seed(seed: int, round_index: int) -> int:
    """The seed a round samples with, derived from the recipe's (recorded in the round's counts.json and
    round.json)."""
    return derive_seed(seed, "iterative", "round", round_index)


def select_pairs(plan: Plan, scored: list[dict]) -> tuple[list[dict], dict]:
    """The round's pairs and what was dropped, by reason."""
    owner = plan.plugins.implementers("posttrain_select_pair")
    counts = {"prompts": len(scored), "pairs": 0, "dropped_all_abstained": 0, "dropped_one_scored": 0,
              "dropped_tie": 0, "dropped_by_selection": 0}
    pairs = []
    for item in scored:
        kept = [i for i, r in enumerate(item["rewards"]) if r is not None]
        if not kept:
            counts["dropped_all_abstained"] += 1
            continue
        if len(kept) < 2:
            counts["dropped_one_scored"] += 1
            continue
        rewards = [item["rewards"][i] for i in kept]
        completions = [item["completions"][i] for i in kept]
        if max(rewards) == min(rewards):
            counts["dropped_tie"] += 1
            continue
        if owner:
            choice = plan.plugins.call("posttrain_select_pair", prompt=item["row"]["prompt"], completions=completions,
                                       rewards=rewards)
            if choice is not None and not all(0 <= c < len(kept) for c in choice):
                from ..errors import contract_error

                raise contract_error(owner[0], "posttrain_select_pair", choice,
                                     f"indices into the {len(kept)} scored samples")
        else:
            choice = best_and_worst(rewards)
        if choice is None:
            counts["dropped_by_selection"] += 1
            continue
        chosen, rejected = choice
        row = {k: v for k, v in item["row"].items() if k not in ("chosen", "rejected")}
        pairs.append({**row, "chosen": _as_response(item["row"]["prompt"], completions[chosen]),
                      "rejected": _as_response(item["row"]["prompt"], completions[rejected]),
                      "chosen_reward": rewards[chosen], "rejected_reward": rewards[rejected]})
    counts["pairs"] = len(pairs)
    return pairs, counts


def _as_response(prompt, text: str):
    """A sample in the prompt's form: an assistant message for chat prompts, the text for plain ones."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


class Rounds:
    """The state of an iterative run: the policy (and its reference) carried from round to round."""

    def __init__(self, plan: Plan, run_dir: Path):
        self.plan, self.run_dir = plan, run_dir
        recipe = plan.recipe
        self.train, self.heldout = load_data(plan)
        self.precision = run_precision(recipe)
        self.start_path = resolve_model_path(recipe.model.name_or_path)
        self.tokenizer = load_tokenizer(recipe, self.start_path)
        self.train = limit_prompts(plan, self.train, self.tokenizer, "train")
        self.heldout = limit_prompts(plan, self.heldout, self.tokenizer, "eval")
        model, peft_config = load_model(recipe, self.start_path, self.precision)
        if peft_config is not None:
            from peft import get_peft_model
            from transformers import set_seed

            set_seed(recipe.seed)  # the adapter's random initialisation, as TRL seeds it for the other stages
            model = get_peft_model(model, peft_config)  # one adapter, trained across the rounds
        self.model = model
        self.lora = peft_config is not None
        self.moves_reference = bool(plan.plugins.implementers("posttrain_update_reference"))
        self.trainer = None

    # -- the trainer --------------------------------------------------------------------------

    def build_trainer(self, pairs: list[dict]):
        """The one PreferenceTrainer of the run, built when the first pairs exist."""
        from datasets import Dataset

        plan, recipe = self.plan, self.plan.recipe
        config = build_config(DPOConfig, plan, self.run_dir, self.precision)
        extra = {}
        if not self.lora and plan.plugins.reference_needed(STAGE):
            extra["ref_model"] = load_frozen_model(recipe, resolve_model_path(recipe.model.reference or self.start_path),
                                                   self.precision)
        elif self.lora and recipe.model.reference is not None:
            raise UserError("with LoRA the iterative stage's reference is the starting model or the 'ref' adapter",
                            field="model.reference", fix="remove model.reference")
        # Given a PEFT model, TRL adds a 'ref' adapter copying the policy's. Keep the reference this run
        # has (a restored 'ref' adapter), or none: without a reference-update plugin the reference is the
        # starting model, the adapter-disabled base.
        saved_ref = None
        if self.lora and REF_ADAPTER in self.model.peft_config:
            from peft import get_peft_model_state_dict

            saved_ref = {k: v.clone() for k, v in get_peft_model_state_dict(self.model, adapter_name=REF_ADAPTER).items()}
            self.model.delete_adapter(REF_ADAPTER)
        trainer = PreferenceTrainer(model=self.model, args=config, train_dataset=Dataset.from_list(pairs),
                                    processing_class=self.tokenizer, callbacks=trainer_callbacks(plan, self.run_dir),
                                    plugins=plan.plugins, stage=STAGE, **extra)
        trainer = finish_trainer(trainer, self.precision)
        if self.lora and REF_ADAPTER in self.model.peft_config:
            if saved_ref is not None:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(self.model, saved_ref, REF_ADAPTER)
            elif not self.moves_reference:
                self.model.delete_adapter(REF_ADAPTER)
        self.trainer = trainer
        return trainer

    def set_pairs(self, pairs: list[dict]) -> None:
        from datasets import Dataset

        if self.trainer is None:
            self.build_trainer(pairs)
        else:
            t = self.trainer
            t.train_dataset = t._prepare_dataset(Dataset.from_list(pairs), t.processing_class, t.args, "train")
        if len(self.trainer.train_dataset) == 0:
            raise UserError(f"every one of the round's {len(pairs)} pairs was dropped when tokenised (longer than "
                            f"training.max_length = {self.trainer.args.max_length} tokens)", field="training.max_length",
                            fix="raise training.max_length, or shorten the prompts or sampling.max_new_tokens")

    # -- state between rounds ------------------------------------------------------------------

    def save(self, round_dir: Path) -> None:
        """The round's policy (and moved reference). Every process calls this: under ZeRO-3 the weights are
        gathered from all of them; rank 0 writes."""
        self.trainer.save_model(str(round_dir / "final"))
        ref = self.trainer.ref_model
        if not self.lora and self.moves_reference and ref is not None:
            from ..reference import gathered

            ref = getattr(ref, "module", ref)  # a DeepSpeed engine holds the reference under ZeRO-3
            with gathered(list(ref.parameters())):
                if is_main():
                    ref.save_pretrained(round_dir / "reference")

    def restore(self, round_dir: Path) -> None:
        """The policy (and reference) as a finished round left them."""
        final = round_dir / "final"
        if self.lora:
            from peft import set_peft_model_state_dict

            from ..reference import add_reference_adapter

            set_peft_model_state_dict(self.model, load_tensors(final / ADAPTER_FILE), "default")
            ref_adapter = final / REF_ADAPTER / ADAPTER_FILE
            if ref_adapter.is_file():
                add_reference_adapter(self.model)
                set_peft_model_state_dict(self.model, load_tensors(ref_adapter), REF_ADAPTER)
            return
        self.model.load_state_dict(load_tensors(final), strict=False)
        self._pending_reference = round_dir / "reference" if (round_dir / "reference").is_dir() else None

    def restore_reference(self) -> None:
        """Full fine-tuning: the saved reference of the last finished round, once the trainer holds one."""
        path = getattr(self, "_pending_reference", None)
        if path is not None and self.trainer is not None and self.trainer.ref_model is not None:
            self.trainer.ref_model.load_state_dict(load_tensors(path), strict=False)
            self._pending_reference = None

    # -- evaluation and sampling ---------------------------------------------------------------

    @contextlib.contextmanager
    def _sampling_model(self):
        """The model to sample from and a factory of its compute-dtype context (a new one per use). Once the
        trainer exists under DeepSpeed ZeRO-3, every process gathers the whole policy for the time of the
        block, and then samples its own share of the prompts with no collective call."""
        if self.trainer is not None:
            with generation_model(self.trainer) as model:
                yield model, self.trainer.accelerator.autocast
            return
        self.model.to(distributed_state().device)
        yield self.model, compute_autocast(self.precision)

    def heldout_answers(self) -> dict | None:
        if self.trainer is not None:
            return answer_metrics(self.plan, self.trainer, self.heldout)
        with self._sampling_model() as (model, autocast):
            return greedy_answers(self.plan, model, self.tokenizer, self.heldout, autocast())

    def sample_round(self, rows: list[dict], seed: int) -> list[dict]:
        with self._sampling_model() as (model, autocast):
            return sample_and_score(self.plan, model, self.tokenizer, rows, autocast, seed)


def run(plan: Plan, run_dir: Path, resume: bool) -> dict:
    """Every round, then the final model and the summary (``summary.json``)."""
    recipe = plan.recipe
    total = plan.options.rounds
    state = Rounds(plan, run_dir)
    main = is_main()
    metrics = run_dir / "metrics.jsonl"
    before_file = run_dir / "eval_before.json"
    rounds_done = []
    if resume and before_file.is_file():
        before = json.loads(before_file.read_text())
    else:
        if main:
            metrics.unlink(missing_ok=True)
        before = {"answers": state.heldout_answers()} if recipe.eval.before else {}
        if main:
            before_file.write_text(json.dumps(before, indent=2, default=str))
    started = time.time()
    for r in range(1, total + 1):
        round_dir = run_dir / f"round-{r:02d}"
        if (round_dir / "round.json").is_file():
            rounds_done.append(json.loads((round_dir / "round.json").read_text()))
            state.restore(round_dir)
            if main:
                print(f"posttrain: round {r} finished earlier; its samples, pairs and policy are reused", flush=True)
            continue
        round_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        if (round_dir / "pairs.jsonl").is_file():  # interrupted after sampling: the same pairs again
            pairs, counts = read_jsonl(round_dir / "pairs.jsonl"), json.loads((round_dir / "counts.json").read_text())
            scored = read_jsonl(round_dir / "samples.jsonl")
        else:
            rows = round_prompts(rows_of(state.train), plan.options.sampling, r, recipe.seed)
            scored = state.sample_round(rows, round_seed(recipe.seed, r))
            pairs, counts = select_pairs(plan, scored)
            counts["seed"] = round_seed(recipe.seed, r)
            if main:
                write_jsonl(round_dir / "samples.jsonl", [
                    {"prompt": s["row"]["prompt"], "completions": s["completions"], "rewards": s["rewards"],
                     "by_source": s["by_source"]} for s in scored])
                (round_dir / "counts.json").write_text(json.dumps(counts))
                write_jsonl(round_dir / "pairs.jsonl", pairs)
        if not pairs:
            raise UserError(f"round {r} kept no pair from {counts['prompts']} prompts ({_describe(counts)}); its "
                            f"samples are in {round_dir / 'samples.jsonl'}", field="sampling",
                            fix="sample more completions per prompt (sampling.samples), raise sampling.temperature, "
                                "or use a reward that separates the samples (a lower min_gap)")
        state.set_pairs(pairs)
        state.restore_reference()
        trainer = state.trainer
        trainer.args.output_dir = str(round_dir)
        trainer.optimizer, trainer.lr_scheduler = None, None  # a new optimizer and schedule every round
        if trainer.is_deepspeed_enabled:
            # train() frees the last round's DeepSpeed engine; the module (its ZeRO-3 shards as they are) gets a
            # new one, as it gets a new optimizer
            trainer.model_wrapped = trainer.model
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, MetricsWriter):
                callback.extra = {"round": r}
        checkpoint = last_checkpoint(round_dir)
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        raise_if_stopped(trainer, STAGE, run_dir)
        plan.plugins.call("posttrain_update_reference", trainer=trainer, event="round", step=r)
        after = state.heldout_answers()
        info = {
            "round": r, **counts,
            "sample_mean_reward": _mean(x for s in scored for x in s["rewards"]),
            "chosen_mean_reward": _mean(p["chosen_reward"] for p in pairs),
            "rejected_mean_reward": _mean(p["rejected_reward"] for p in pairs),
            "global_step": trainer.state.global_step,
            "train_loss": next((h["train_loss"] for h in reversed(trainer.state.log_history) if "train_loss" in h),
                               None),
            "answers": after, "seconds": round(time.time() - t0, 1),
        }
        state.save(round_dir)
        if main:
            (round_dir / "round.json").write_text(json.dumps(info, indent=2, default=str))
        if main:
            print(f"posttrain: round {r}: {counts['pairs']} pairs from {counts['prompts']} prompts "
                  f"({_describe(counts)}), sample reward {_fmt(info['sample_mean_reward'])}, held-out answer "
                  f"accuracy {_fmt((after or {}).get('answer_accuracy'))}", flush=True)
        rounds_done.append(info)
    final = run_dir / "final"
    if state.trainer is not None:  # every process (ZeRO-3 gathers the weights); rank 0 writes
        state.trainer.save_model(str(final))
    summary = {
        "recipe": recipe.name, "stage": STAGE, "plugins": list(plan.plugins.by_name), "rounds": rounds_done,
        "global_step": sum(x.get("global_step", 0) for x in rounds_done),
        "train_seconds_this_session": round(time.time() - started, 1),
        "heldout_examples": len(state.heldout) if state.heldout is not None else 0,
        "data_transforms": plan.data_log, "data_sources": plan.data_sources,
        "before": before, "after": {"answers": rounds_done[-1].get("answers")},
        "final_model": str(final),
    }
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _describe(counts: dict) -> str:
    names = {"dropped_all_abstained": "no sample scored", "dropped_one_scored": "one sample scored",
             "dropped_tie": "a tie", "dropped_by_selection": "dropped by the pair selection"}
    parts = [f"{counts[k]} {v}" for k, v in names.items() if counts.get(k)]
    return ", ".join(parts) or "none dropped"


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
