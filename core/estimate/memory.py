"""The memory model: the bytes of each moment of a training step for a :class:`Setup`, by term, and its peak.

:func:`compute` reads top to bottom: what is held through the whole step (:func:`stored_terms`: the
weights, trained or master weights, optimizer state and DDP/DeepSpeed buffers; :func:`other_model_terms`:
the reference, reward models and critic), the activations of one micro-batch (:func:`activation_terms`),
the fused LM head's buffers (:func:`lm_head_terms`), then the moments of the step (:func:`step_phases`:
the forward pass, either end of the backward pass, the optimizer step; :func:`generation_phase`). The
peak is the largest moment, plus :func:`overhead` for the CUDA context and the caching allocator.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .activations import activation_dtypes, per_token_layer
from .constants import (ALLOCATOR_SLACK, BYTES, CUDA_CONTEXT_GIB, DS_MAX_LIVE_PARAMETERS, DS_PREFETCH_BUCKET,
                        DS_REDUCE_BUCKET, FOREACH_TEMPORARY, HEAD_TOKEN_TILE, HEAD_VOCAB_TILE, KBIT_UPCASTS_UNQUANTISED,
                        NCCL_BUFFERS_GIB, OPTIMIZERS, GiB)
from .parameters import (critic_bytes, frozen_weight_bytes, lora_params, optimizer_spec, optimizer_state_bytes,
                         trained_params)
from .setup import Setup


@dataclass
class Terms:
    """Bytes of one moment of a training step, by row of the breakdown."""

    weights: float = 0.0
    trainable: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    logits: float = 0.0
    reference: float = 0.0
    reward_models: float = 0.0
    critic: float = 0.0
    generation: float = 0.0
    buffers: float = 0.0

    @property
    def total(self) -> float:
        return sum(vars(self).values())


@dataclass
class Estimate:
    """The estimate of one setup: every moment's terms, the peak moment and the overhead on top of it."""

    setup: Setup
    phases: dict  # moment -> Terms
    peak_phase: str
    peak: Terms
    overhead: float
    trainable_params: int
    details: dict  # intermediate numbers (bytes), for the docs and tests

    @property
    def peak_allocated(self) -> float:
        return self.peak.total

    @property
    def total(self) -> float:
        return self.peak.total + self.overhead


@dataclass
class Activations:
    """The activations of one micro-batch (bytes), as the moments of the step hold them."""

    tokens: int  # tokens of the micro-batch
    per_token_layer: float  # what one token keeps in one block
    autocast_copies: float  # autocast's compute-dtype copies of one block's trained weights
    extras: float  # the final norm and the LM head's (or score head's) input
    stored: float  # what the forward pass leaves for the backward pass
    recompute: float  # with checkpointing: one block, recomputed during its backward
    forward_copies: float  # with checkpointing: every block's autocast copies during the forward pass
    workspace: float  # gradients of the MLP's widest tensors, one block at a time


def compute(s: Setup) -> Estimate:
    """The estimate of one setup (see the module docstring and docs/estimate.md)."""
    trained_n = trained_params(s)
    t, grads = stored_terms(s, trained_n)
    t.reference, t.reward_models, t.critic = other_model_terms(s)
    details: dict[str, Any] = {"trainable_params": trained_n}

    act = activation_terms(s)
    logits, head_grad = lm_head_terms(s)
    details.update(tokens=act.tokens, per_token_layer=act.per_token_layer, stored=act.stored,
                   recompute=act.recompute, workspace=act.workspace, autocast_copies_per_layer=act.autocast_copies,
                   extras=act.extras, grads=grads, logits=logits)

    phases = step_phases(s, t, act, logits, head_grad, grads, trained_n)
    if s.generation_rows:
        phases["generation"], kv, prefill = generation_phase(s, t, grads)
        details.update(kv_cache=kv, prefill=prefill)

    peak_phase = max(phases, key=lambda k: phases[k].total)
    peak = phases[peak_phase]
    return Estimate(s, phases, peak_phase, peak, overhead(peak.total, s.processes), trained_n, details)


def overhead(peak_allocated: float, processes: int) -> float:
    """What a process holds outside max_memory_allocated: the CUDA context, the allocator's slack and,
    with several processes, the communication buffers."""
    return CUDA_CONTEXT_GIB * GiB + ALLOCATOR_SLACK * peak_allocated + (
        NCCL_BUFFERS_GIB * GiB if processes > 1 else 0)


# -- held through the step -------------------------------------------------------------------------


def _offloaded(zero: dict, key: str) -> bool:
    return str((zero.get(key) or {}).get("device", "none")) in ("cpu", "nvme")


def stored_terms(s: Setup, trained_n: int) -> tuple[Terms, float]:
    """The weights, trained (master) weights, optimizer state and buffers held through the step, and the
    bytes of one set of gradients."""
    if s.zero_stage is None:
        return _ddp_terms(s, trained_n)
    return _deepspeed_terms(s, trained_n)


def _ddp_terms(s: Setup, trained_n: int) -> tuple[Terms, float]:
    """One process, or DDP: everything whole on every process, trained weights in the trained dtype."""
    states = optimizer_spec(s)[0]
    tb = BYTES[s.trained]
    t = Terms()
    if s.method == "full":
        t.trainable = trained_n * tb
    else:
        t.weights = frozen_weight_bytes(s)
        t.trainable = trained_n * tb
    grads = trained_n * tb
    t.optimizer = trained_n * states * optimizer_state_bytes(s)
    if max(1, s.processes) > 1:  # DDP keeps a bucket buffer as large as the gradients
        t.buffers += grads
    return t, grads


def _deepspeed_terms(s: Setup, trained_n: int) -> tuple[Terms, float]:
    """DeepSpeed (bf16/fp16 enabled): the module in the compute dtype, float32 master weights and
    optimizer state in the ZeRO optimizer, partitioned over the processes from stage 1 on."""
    sh = s.shape
    c = BYTES[s.compute]
    n_proc = max(1, s.processes)
    stage = s.zero_stage
    zero = s.zero or {}
    offload_opt = _offloaded(zero, "offload_optimizer")
    offload_param = _offloaded(zero, "offload_param")
    states = optimizer_spec(s)[0]
    master_bytes = 4
    state_bytes = OPTIMIZERS.get(s.optim, (2, None, ""))[1] or 4
    t = Terms()
    module = frozen_weight_bytes(s) if s.method != "full" else sh.params * c
    if s.method != "full":
        module += trained_n * c
    t.weights = 0 if offload_param else (module / n_proc if stage >= 3 else module)
    part = (lambda x: x / n_proc) if stage >= 1 else (lambda x: x)  # noqa: E731
    t.trainable = 0 if offload_opt else part(trained_n * master_bytes)
    t.optimizer = 0 if offload_opt else part(trained_n * states * state_bytes)
    grads = trained_n * c / (n_proc if stage >= 2 else 1)
    bucket = zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)
    bucket = sh.hidden ** 2 if bucket == "auto" else float(bucket)
    if stage >= 2:
        t.buffers += min(bucket, trained_n) * c
    if stage >= 3:
        prefetch = zero.get("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET)
        prefetch = 0.9 * sh.hidden ** 2 if prefetch == "auto" else float(prefetch)
        live = float(zero.get("stage3_max_live_parameters", DS_MAX_LIVE_PARAMETERS))
        layer = sh.linear_params_per_layer + sh.other_params_per_layer
        t.buffers += (min(live, 2 * layer) + prefetch) * c  # the gathered block(s) being computed
    return t, grads


def other_model_terms(s: Setup) -> tuple[float, float, float]:
    """The other models the step holds: (the reference copy, frozen reward models, the critic)."""
    n_proc = max(1, s.processes)
    stage = s.zero_stage
    reference = 0.0
    if s.reference == "copy":
        ref_shape = s.reference_shape or s.shape
        reference = ref_shape.params * BYTES[s.reference_dtype or s.compute]
        if stage is not None and stage >= 3:
            reference /= n_proc
    reward_models = 0.0
    for rm_shape, rm_dtype in s.reward_models:
        reward_models += rm_shape.params * BYTES[rm_dtype]
    critic = critic_bytes(s, stage, n_proc) if s.critic is not None else 0.0
    return reference, reward_models, critic


# -- one micro-batch ---------------------------------------------------------------------------------


def _autocast_copies(s: Setup) -> float:
    """Autocast's cached compute-dtype copies of one block's trained weights (trained in another dtype)."""
    c = BYTES[s.compute]
    if s.method == "full" and s.zero_stage is None and BYTES[s.trained] != c:
        return c * s.shape.linear_params_per_layer
    if s.method != "full" and s.zero_stage is None and activation_dtypes(s).lora != c:
        return c * lora_params(s) / s.shape.layers
    return 0.0


def _extras(s: Setup, tokens: int) -> float:
    """Beyond the blocks: the final norm and what the head keeps of its input."""
    sh = s.shape
    d = activation_dtypes(s)
    if s.liger:
        final_norm = d.residual * sh.hidden + 4
    else:
        final_norm = 4 * sh.hidden + 4 + (d.residual * sh.hidden if d.norm_trained else 0)
    head_in = max(d.norm_weight, d.residual) if not s.liger else d.residual
    extras = tokens * final_norm
    if sh.reward_head:
        extras += tokens * d.c * sh.hidden  # the trained score head keeps its input in the compute dtype
    else:
        extras += s.scored_tokens * sh.hidden * head_in  # the fused head keeps the scored hidden states
    return extras


def activation_terms(s: Setup) -> Activations:
    """The activations of one micro-batch: what the forward pass stores (every block's, or with
    checkpointing only each block's input), what one block's recomputation adds, and the workspace."""
    sh = s.shape
    d = activation_dtypes(s)
    N = s.rows * s.seq_len
    layer = per_token_layer(s)
    autocast_copies = _autocast_copies(s)
    extras = _extras(s, N)
    if s.checkpointing:
        stored = sh.layers * N * d.residual * sh.hidden + extras  # each block's input
        recompute = N * layer + autocast_copies  # one block, recomputed during its backward
        forward_copies = sh.layers * autocast_copies
    else:
        stored = sh.layers * (N * layer + autocast_copies) + extras
        recompute = 0.0
        forward_copies = 0.0
    product_bytes = max(d.c, d.residual if d.quantised else d.c)
    workspace = 2 * product_bytes * sh.mlp_width * N  # gradients of the MLP's widest tensors, one block at a time
    return Activations(N, layer, autocast_copies, extras, stored, recompute, forward_copies, workspace)


def lm_head_terms(s: Setup) -> tuple[float, float]:
    """The LM head (TRL's fused, tiled log-prob kernel) during its backward: (its buffers, the head's
    weight gradient when the head is trained)."""
    sh = s.shape
    c = BYTES[s.compute]
    tb = BYTES[s.trained]
    stage = s.zero_stage
    head_trained = (s.method == "full" or "lm_head" in s.lora_extra) and not sh.reward_head
    logits = 0.0
    head_grad = 0.0
    head_weight_bytes = (tb if s.method == "full" and stage is None else
                         c if stage is not None or not (s.quant_bits and KBIT_UPCASTS_UNQUANTISED) else 4)
    if not sh.reward_head and s.scored_tokens:
        tile = min(s.scored_tokens, HEAD_TOKEN_TILE) * min(sh.vocab, HEAD_VOCAB_TILE) * c
        logits += tile + 4 * s.scored_tokens * sh.hidden  # a logits tile + the float32 hidden-state gradient
        if head_weight_bytes != c:
            logits += min(sh.vocab, HEAD_VOCAB_TILE) * sh.hidden * c  # the head's rows cast per tile
        if head_trained:
            head_grad = sh.vocab * sh.hidden * (tb if stage is None else c)
            if head_grad and (stage is not None or tb != 4):
                logits += 4 * sh.vocab * sh.hidden  # accumulated in float32, then cast to the weight's dtype
    return logits, head_grad


# -- the moments of a step ---------------------------------------------------------------------------


def step_phases(s: Setup, static: Terms, act: Activations, logits: float, head_grad: float, grads: float,
                trained_n: int) -> dict[str, Terms]:
    """The moments of a training step, each the held terms plus what that moment adds."""
    phases: dict[str, Terms] = {}
    accumulate = grads if s.grad_accum > 1 else 0.0  # earlier micro-batches' gradients stay
    phases["backward"] = replace(static, activations=act.stored + act.recompute + act.workspace, logits=logits,
                                 gradients=max(head_grad, accumulate))
    if s.checkpointing and act.forward_copies:
        phases["forward"] = replace(static, activations=act.stored + act.forward_copies, gradients=accumulate)
    # the last block of the backward pass (the first of the model): every other gradient exists by then
    phases["end of backward"] = replace(static, activations=act.tokens * act.per_token_layer + act.autocast_copies
                                        + act.workspace, gradients=grads)
    phases["optimizer step"] = replace(static, gradients=grads + _fp32_grads(s, trained_n),
                                       optimizer=static.optimizer + _optimizer_temporary(s, trained_n))
    return phases


def _optimizer_temporary(s: Setup, trained_n: int) -> float:
    """foreach AdamW's temporary (a state's size) during the optimizer step."""
    if s.optim in FOREACH_TEMPORARY and s.zero_stage is None:
        return trained_n * optimizer_state_bytes(s)
    return 0.0


def _fp32_grads(s: Setup, trained_n: int) -> float:
    """DeepSpeed: the float32 gradient partition its optimizer steps with."""
    zero = s.zero or {}
    if s.zero_stage is not None and not _offloaded(zero, "offload_optimizer"):
        return trained_n * 4 / (max(1, s.processes) if s.zero_stage >= 1 else 1)
    return 0.0


def generation_phase(s: Setup, static: Terms, grads: float) -> tuple[Terms, float, float]:
    """Generating (online stage): the KV cache, the prompt pass's widest transient and, under ZeRO-3, the
    gathered weights. Returns the moment's terms, the KV cache and the prompt pass."""
    sh = s.shape
    c = BYTES[s.compute]
    kv = sh.layers * 2 * sh.kv_dim * c * s.generation_rows * (s.prompt_len + s.completion_len)
    prefill = s.generation_rows * s.prompt_len * (3 * c * sh.mlp_width)  # the widest transient of the prompt pass
    gathered = 0.0
    if s.zero_stage is not None and s.zero_stage >= 3 and s.gather_for_generation:
        gathered = sh.params * c * (1 - 1 / max(1, s.processes))
    if s.vllm_fraction:  # vLLM generates in its own reserved share of the GPU (added by add_vllm_share)
        kv, prefill = 0.0, 0.0
    terms = replace(static, generation=kv + prefill + gathered, gradients=0.0 if s.generation_between_steps else grads)
    return terms, kv, prefill


def add_vllm_share(e: Estimate, gpu: float | None) -> None:
    """Colocated vLLM reserves a share of the GPU: add it to the generation moment once the size is known."""
    frac = e.setup.vllm_fraction
    if not frac or "generation" not in e.phases:
        return
    size = gpu if gpu is not None else 80 * GiB
    e.phases["generation"].generation += frac * size
    e.peak_phase = max(e.phases, key=lambda k: e.phases[k].total)
    e.peak = e.phases[e.peak_phase]
    e.overhead = overhead(e.peak.total, e.setup.processes)
