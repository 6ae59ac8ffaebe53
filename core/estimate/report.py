"""What ``posttrain estimate`` prints: each stage's breakdown at its peak moment, the other moments, the
notes, the verdict against ``--gpu-memory`` and the suggested commands (:func:`print_report`), or the same
as JSON (:func:`report_json`)."""

from __future__ import annotations

import re

from .constants import GiB
from .from_recipe import StageReport
from .setup import Setup

# The breakdown's rows: a field of Terms and its label.
ROWS = [
    ("weights", "weights (frozen, stored)"),
    ("trainable", "trainable / master weights"),
    ("gradients", "gradients"),
    ("optimizer", "optimizer state"),
    ("activations", "activations"),
    ("logits", "logits (fused LM head)"),
    ("reference", "reference model"),
    ("reward_models", "reward models"),
    ("critic", "critic (weights, gradients, AdamW)"),
    ("generation", "generation (KV cache)"),
    ("buffers", "DDP / DeepSpeed buffers"),
]


def _gib(x: float) -> float:
    return round(x / GiB, 3)


def describe_setup(s: Setup) -> str:
    """The model and how it is trained, in one line."""
    sh = s.shape
    how = "full fine-tuning"
    if s.method == "lora":
        how = f"LoRA r={s.lora_r} on {len(s.lora_targets)} of {len(sh.linears())} linear layers per block"
        if s.quant_bits:
            how = f"QLoRA ({s.quant_bits}-bit base), " + how
    ds = f", DeepSpeed ZeRO-{s.zero_stage}" if s.zero_stage is not None else ""
    return (f"{sh.params / 1e9:.2f}B parameters ({sh.model_type}, {sh.layers} layers, hidden {sh.hidden}); {how}; "
            f"compute {s.compute}, trained weights {s.trained}{ds}; {s.processes} process(es)")


def batch_text(s: Setup) -> str:
    """The micro-batch, checkpointing, Liger, accumulation and the reference, in one line."""
    text = f"{s.rows} {s.unit} x {s.seq_len} tokens per micro-batch"
    if s.prompt_len:
        text += f" ({s.prompt_len} prompt + {s.completion_len} completion); {s.generation_rows} generated at once"
    text += f"; activation checkpointing {'on' if s.checkpointing else 'off'}"
    if s.liger:
        text += "; Liger kernels"
    if s.grad_accum > 1:
        text += f"; {s.grad_accum} accumulation steps"
    ref = {"none": "none", "adapter": "the base with the adapter disabled (no copy)",
           "copy": f"a frozen copy in {s.reference_dtype or s.compute}",
           "precomputed": "precomputed log-probs (none loaded)"}[s.reference]
    return text + f"; reference: {ref}"


def report_json(reports: list[StageReport], recipe: str) -> dict:
    """What ``posttrain estimate --json`` prints: the recipe's worst stage and verdict, and every stage."""
    stages = []
    for r in reports:
        e = r.estimate
        stages.append({
            "stage_name": r.label,
            "stage": r.stage,
            "model": e.setup.shape.describe(),
            "setup": {
                "method": e.setup.method + ("" if not e.setup.quant_bits else f"+{e.setup.quant_bits}bit"),
                "compute_dtype": e.setup.compute, "trained_dtype": e.setup.trained,
                "trainable_parameters": e.trainable_params, "sequences_per_micro_batch": e.setup.rows,
                "tokens_per_sequence": e.setup.seq_len, "activation_checkpointing": e.setup.checkpointing,
                "liger": e.setup.liger, "optimizer": e.setup.optim, "reference": e.setup.reference,
                "deepspeed_zero_stage": e.setup.zero_stage, "processes": e.setup.processes,
                "gradient_accumulation_steps": e.setup.grad_accum,
            },
            "breakdown_gib": {**{k: _gib(getattr(e.peak, k)) for k, _ in ROWS}, "overhead": _gib(e.overhead)},
            "peak_phase": e.peak_phase,
            "phases_gib": {k: _gib(v.total) for k, v in e.phases.items()},
            # what generating adds at its moment: the KV cache, the prompt pass and (ZeRO-3) the gathered weights
            "generation_gib": _gib(e.phases["generation"].generation) if "generation" in e.phases else None,
            "peak_allocated_gib": _gib(e.peak_allocated),
            "overhead_gib": _gib(e.overhead),
            "total_gib": _gib(e.total),
            "gpu_memory_gib": None if r.gpu is None else _gib(r.gpu),
            "fits": r.fits,
            "suggestions": [{"change": sg.change, "set": sg.sets, "processes": sg.processes,
                             "total_gib": _gib(sg.estimate.total), "fits": sg.fits(r.gpu)}
                            for sg in r.suggestions],
            "notes": list(dict.fromkeys(e.setup.notes)),
        })
    worst = max(reports, key=lambda r: r.estimate.total)
    gpu = reports[0].gpu
    return {"recipe": recipe, "gpu_memory_gib": None if gpu is None else _gib(gpu),
            "total_gib": _gib(worst.estimate.total), "peak_allocated_gib": _gib(worst.estimate.peak_allocated),
            "fits": None if gpu is None else all(r.fits for r in reports), "stages": stages}


def _quote(text: str) -> str:
    return f"'{text}'" if re.search(r"[\s{}:,\[\]'\"]", text) else text


def _set_flags(sets: list, flag: str = "--set") -> str:
    return " ".join(f"{flag} {_quote(s)}" for s in sets)


def print_report(reports: list[StageReport], recipe: str, sets: list = (), unsets: list = ()) -> None:
    """The breakdown, verdict and suggestions as text; ``sets``/``unsets`` are the user's own
    --set/--unset values (repeated in the suggested commands)."""
    for r in reports:
        e = r.estimate
        title = f"stage '{r.label}' ({r.stage})" if len(reports) > 1 else f"recipe '{recipe}' ({r.stage})"
        print(title)
        print(f"  model:   {describe_setup(e.setup)}")
        print(f"  batch:   {batch_text(e.setup)}")
        _print_breakdown(r)
        if r.gpu is None:
            print("  give --gpu-memory (e.g. 24GB) for a verdict")
        elif r.fits:
            print(f"  verdict: fits in {r.gpu / GiB:.0f} GiB ({(r.gpu - e.total) / GiB:.2f} GiB to spare)")
        else:
            print(f"  verdict: does NOT fit in {r.gpu / GiB:.0f} GiB (needs about {e.total / GiB:.2f} GiB)")
            _print_suggestions(r, recipe, sets, unsets)
        if len(reports) > 1:
            print()


def _print_breakdown(r: StageReport) -> None:
    """The terms of the peak moment, the overhead and total, the other moments and the notes."""
    e = r.estimate
    print(f"  peak per GPU, during the {e.peak_phase} (GiB):")
    for key, label in ROWS:
        value = getattr(e.peak, key)
        if value or key in ("weights", "trainable", "gradients", "optimizer", "activations", "logits",
                            "reference"):
            print(f"    {label:<36} {value / GiB:8.2f}")
    print(f"    {'overhead (CUDA context, allocator)':<36} {e.overhead / GiB:8.2f}")
    print(f"    {'total':<36} {e.total / GiB:8.2f}   (allocated by torch: {e.peak_allocated / GiB:.2f})")
    others = ", ".join(f"{k} {v.total / GiB:.2f}" for k, v in e.phases.items() if k != e.peak_phase)
    if others:
        print(f"  other moments (GiB, without overhead): {others}")
    for note in dict.fromkeys(e.setup.notes):
        print(f"  note: {note}")


def _print_suggestions(r: StageReport, recipe: str, sets: list, unsets: list) -> None:
    """The first change that fits (and a ZeRO-3 alternative when that one gives up full fine-tuning),
    each with the command that checks it; or the smallest estimate when none fits."""
    first = next((sg for sg in r.suggestions if sg.fits(r.gpu)), None)
    zero3 = None
    if first is not None and any(".lora=" in x or ".quantization=" in x for x in first.sets):
        # an alternative that keeps full fine-tuning
        zero3 = next((sg for sg in r.suggestions if sg.fits(r.gpu) and sg.processes), None)
    if first is None:
        best = min(r.suggestions, key=lambda sg: sg.estimate.total, default=None)
        print("  none of the changes tried fits" + (
            f"; the smallest: {best.change} ({best.estimate.total / GiB:.2f} GiB)" if best else ""))
    for sg in [first] + ([zero3] if zero3 is not None and zero3 is not first else []):
        if sg is None:
            continue
        launch = f" --processes {sg.processes}" if sg.processes else ""
        print(f"  suggestion: {sg.change}: {sg.estimate.total / GiB:.2f} GiB")
        own = " ".join(x for x in (_set_flags(sets), _set_flags(unsets, "--unset")) if x)
        print(f"    posttrain estimate {_quote(recipe)} {own + ' ' if own else ''}{_set_flags(sg.sets)}"
              f"{launch} --gpu-memory {r.gpu / GiB:g}GiB")
