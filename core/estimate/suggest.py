"""Suggestions for a stage that does not fit: the changes to try, in order (activation checkpointing,
smaller per-device batches with the same effective batch, LoRA, QLoRA, DeepSpeed ZeRO-3 over 2, 4 or 8
GPUs), each checked by an ``attempt`` callable that estimates the recipe with the change; the first that
fits (and the first ZeRO-3 one) then gets the largest per-device batch that still fits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .memory import Estimate
from .setup import Setup


@dataclass
class Suggestion:
    """A change to the recipe (``--set`` values, and processes for ZeRO-3) and the estimate with it."""

    change: str
    sets: list  # --set KEY=VALUE strings
    processes: int | None
    estimate: Estimate | None = None

    def fits(self, gpu: float) -> bool:
        return self.estimate is not None and self.estimate.total <= gpu


def candidate_changes(s: Setup, prefix: str, cfg_batch: int, cfg_accum: int) -> list[tuple[str, list, int | None]]:
    """Changes to try, in order, each on top of the ones before (ZeRO-3 instead of LoRA/QLoRA)."""
    steps: list[tuple[str, list, int | None]] = []
    base: list[str] = []
    if not s.checkpointing:
        base = [f"{prefix}training.activation_checkpointing=true"]
        steps.append(("turn on activation checkpointing", list(base), None))
    batch = cfg_batch
    while batch > 1:
        batch = max(1, batch // 2)
        accum = cfg_accum * cfg_batch // batch
        sets = base + [f"{prefix}training.per_device_train_batch_size={batch}",
                       f"{prefix}training.gradient_accumulation_steps={accum}"]
        steps.append((f"per-device batch {batch} with {accum} accumulation steps (same effective batch)", sets, None))
    batched = steps[-1][1] if steps else list(base)
    adapter = list(batched)
    if s.method == "full":
        adapter = batched + [f"{prefix}model.lora={{r: 16, alpha: 32}}"]
        steps.append(("train a LoRA adapter (r 16, all linear layers) instead of every weight", adapter, None))
    if not s.quant_bits:
        steps.append(("QLoRA: load the base in 4-bit (nf4)", adapter + [f"{prefix}model.quantization={{bits: 4}}"],
                      None))
    if s.method == "full" and (s.zero_stage or 0) < 3:
        for n in (2, 4, 8):
            ds = (f"{prefix}training.deepspeed={{zero_optimization: {{stage: 3}}, bf16: {{enabled: auto}}, "
                  "train_micro_batch_size_per_gpu: auto, gradient_accumulation_steps: auto}")
            steps.append((f"DeepSpeed ZeRO-3 over {n} GPUs (keeps full fine-tuning)", batched + [ds], n))
    return steps


def suggest_changes(s: Setup, prefix: str, batch: int, accum: int, gpu: float,
                    attempt: Callable[[list, int | None], Estimate | None]) -> list[Suggestion]:
    """Try the changes of :func:`candidate_changes` in order; ``attempt(sets, processes)`` is the estimate
    of the recipe with those ``--set`` values on that many processes (None: the recipe's own), or None when
    the recipe refuses them. The first change that fits (and the first ZeRO-3 one) then gets the largest
    per-device batch that still fits."""
    out: list[Suggestion] = []
    for change, sets, procs in candidate_changes(s, prefix, batch, accum):
        estimate = attempt(sets, procs)
        if estimate is not None:
            out.append(Suggestion(change, sets, procs, estimate))
    for sg in {id(x): x for x in (next((x for x in out if x.fits(gpu)), None),
                                   next((x for x in out if x.fits(gpu) and x.processes), None)) if x}.values():
        _largest_batch(sg, prefix, batch, accum, gpu, attempt)
    return out


def _largest_batch(sg: Suggestion, prefix: str, batch: int, accum: int, gpu: float,
                   attempt: Callable[[list, int | None], Estimate | None]) -> None:
    """Give a suggestion that halved the per-device batch the largest batch (same effective batch) that
    still fits with its other changes."""
    batch_keys = (f"{prefix}training.per_device_train_batch_size=", f"{prefix}training.gradient_accumulation_steps=")
    rest = [x for x in sg.sets if not x.startswith(batch_keys)]
    if len(rest) == len(sg.sets) or "per-device batch" in sg.change:
        return
    tried = batch
    while tried > 1:
        sets = rest if tried == batch else rest + [f"{batch_keys[0]}{tried}",
                                                   f"{batch_keys[1]}{accum * batch // tried}"]
        estimate = attempt(sets, sg.processes)
        if estimate is not None and estimate.total <= gpu:
            sg.sets, sg.estimate = sets, estimate
            return
        tried //= 2
