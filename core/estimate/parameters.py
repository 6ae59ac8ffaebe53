"""Parameters and what they take: the LoRA adapters and modules_to_save a setup trains, the policy's
frozen (possibly 4/8-bit) weights, the critic, and the state the optimizer keeps per trained parameter."""

from __future__ import annotations

from dataclasses import replace

from .constants import BYTES, KBIT_UPCASTS_UNQUANTISED, NF4_BLOCK, NF4_SECOND_BLOCK, OPTIMIZERS
from .setup import Setup


def trained_params(s: Setup) -> int:
    """The parameters the optimizer steps: every one in full fine-tuning, else the LoRA adapters and
    modules_to_save."""
    if s.method == "full":
        return s.shape.params
    return lora_params(s) + extra_trained_params(s)


def lora_params(s: Setup) -> int:
    """The LoRA adapters' parameters: r x (in + out) for each targeted matrix of every block."""
    sh = s.shape
    n = 0
    for name, (a, b) in sh.linears().items():
        if name in s.lora_targets:
            n += s.lora_r * (a + b) * sh.copies(name)
    return n * sh.layers


def extra_trained_params(s: Setup) -> int:
    """modules_to_save: full trained copies (the reward model's score head always)."""
    sh = s.shape
    n = 0
    for name in s.lora_extra:
        if name == "lm_head" and not sh.reward_head:
            n += sh.vocab * sh.hidden
        elif name == "embed_tokens":
            n += sh.embedding_params
        elif name == "score" and sh.reward_head:
            n += sh.hidden
    return n


CRITIC_TRAINED_BYTES = 4 + 4 + 8  # float32 weight, its gradient, AdamW's two float32 moments


def critic_bytes(s: Setup, stage: int | None = None, n_proc: int = 1) -> float:
    """The critic. On the policy's base: a second LoRA adapter on the policy's targets and a value head (the base
    is the policy's own), counted whole on every process with float32 weights, gradients and AdamW. A value
    model (its base in the compute dtype, its LoRA adapter on all linear layers and its score head, or with
    lora_r 0 every weight trained): without DeepSpeed whole on every process; under DeepSpeed a DeepSpeed
    engine of its own with the policy's ZeRO stage, so its float32 masters and AdamW state are partitioned
    from stage 1, its gradients from stage 2 and its weights at stage 3, as the policy's are."""
    shape, r, dtype = s.critic
    if shape is None:
        trained = lora_params(replace(s, lora_r=r)) + s.shape.hidden + 1
        return trained * CRITIC_TRAINED_BYTES
    if r == 0:
        trained, frozen = shape.params, 0
    else:
        trained = lora_params(replace(s, shape=shape, lora_r=r, lora_targets=tuple(shape.linears()))) + shape.hidden
        frozen = shape.params
    if stage is None:
        return frozen * BYTES[dtype] + trained * CRITIC_TRAINED_BYTES
    c = BYTES[dtype]
    module = (frozen + trained) * c / (n_proc if stage >= 3 else 1)  # the engine's module in the compute dtype
    masters_and_adamw = trained * (4 + 8) / (n_proc if stage >= 1 else 1)
    grads = trained * c / (n_proc if stage >= 2 else 1)
    return module + masters_and_adamw + grads


def frozen_weight_bytes(s: Setup) -> float:
    """The policy's frozen weights (LoRA/QLoRA base)."""
    sh = s.shape
    c = BYTES[s.compute]
    if not s.quant_bits:
        return sh.params * c
    per_param = 0.5 + ((1 + 4 / NF4_SECOND_BLOCK) / NF4_BLOCK if s.double_quant else 4 / NF4_BLOCK)
    if s.quant_bits == 8:
        per_param = 1 + 4 / sh.hidden  # int8 weights + one float32 scale per output row
    rest = sh.params - sh.linear_params
    return sh.linear_params * per_param + rest * (4 if KBIT_UPCASTS_UNQUANTISED else c)


def optimizer_spec(s: Setup) -> tuple[int, float | None, str]:
    """(states per trained parameter, bytes per state or None for the trained dtype's, what is assumed)."""
    spec = OPTIMIZERS.get(s.optim)
    if spec is None:
        return 2, None, f"training.optim '{s.optim}' is not modelled: counted as AdamW (two states)"
    return spec


def optimizer_state_bytes(s: Setup) -> float:
    """Bytes per optimizer state without DeepSpeed: the optimizer's own, else the trained dtype's."""
    state_bytes = optimizer_spec(s)[1]
    return state_bytes if state_bytes is not None else BYTES[s.trained]
