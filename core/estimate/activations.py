"""Activations: what autograd keeps for the backward pass of one decoder block, per token, by part.

Read off the Llama block as transformers 5 runs it under torch autocast (docs/estimate.md has the
derivation; tests/test_estimate.py checks the totals against autograd's saved tensors on a tiny Llama).
:func:`layer_activation_bytes` gives the parts, :func:`per_token_layer` their sum for one token.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import BYTES, KBIT_UPCASTS_UNQUANTISED
from .setup import Setup


@dataclass
class ActivationDtypes:
    """Bytes per element of the tensors in a block, from the precision and the training method."""

    c: int  # compute dtype (autocast)
    residual: int  # the residual stream (the dtype of the embedding's output)
    norm_weight: int
    norm_trained: bool
    lora: int  # adapter weights
    quantised: bool


def activation_dtypes(s: Setup) -> ActivationDtypes:
    c = BYTES[s.compute]
    if s.zero_stage is not None:  # DeepSpeed holds the module in the compute dtype
        return ActivationDtypes(c, c, c, s.method == "full", c, False)
    if s.method == "full":
        t = BYTES[s.trained]
        return ActivationDtypes(c, t, t, True, t, False)
    if s.quant_bits and KBIT_UPCASTS_UNQUANTISED:
        return ActivationDtypes(c, 4, 4, False, BYTES[s.trained], True)
    return ActivationDtypes(c, c, c, False, BYTES[s.trained], bool(s.quant_bits))


def module_kinds(s: Setup) -> dict[str, str]:
    """Each linear layer of a block: 'full' (trained), 'lora' (frozen base + adapter) or 'frozen'."""
    names = s.shape.linears()
    if s.method == "full":
        return {n: "full" for n in names}
    return {n: ("lora" if n in s.lora_targets else "frozen") for n in names}


def _consumers(s: Setup, d: ActivationDtypes, kinds: dict[str, str], x_bytes: int, dim: int, names: list[str],
               already_saved: bool = False) -> float:
    """Bytes per token the layers reading one tensor keep of it."""
    c = d.c
    dropout = s.lora_dropout > 0
    saved, shared = 0.0, False
    for name in names:
        kind = kinds[name]
        if kind == "full":
            if x_bytes == c:
                shared = True
            else:
                saved += c * dim  # autocast casts the input for each layer; each keeps its copy
        elif kind == "lora":
            saved += c * s.lora_r  # lora_A's output, kept by lora_B
            if dropout:
                # the dropout mask + the adapter's input in the compute dtype
                saved += (s.dropout_mask_bytes + c) * dim
            elif d.lora == c and x_bytes == c:
                shared = True
            else:
                saved += c * dim  # peft casts x to the adapter's dtype, autocast casts it back: a copy
    if shared and not already_saved:
        saved += x_bytes * dim
    return saved


def _out_bytes(d: ActivationDtypes, kinds: dict[str, str], name: str, x_bytes: int) -> int:
    # bitsandbytes layers return their input's dtype; others compute in the autocast dtype
    return x_bytes if (d.quantised and kinds[name] != "full") else d.c


def _norm(s: Setup, d: ActivationDtypes) -> tuple[float, int]:
    """What one RMSNorm keeps per token, and the bytes per element of its output."""
    h = s.shape.hidden
    if s.liger:  # Liger's RMSNorm keeps its input and the inverse RMS; output in the input's dtype
        return d.residual * h + 4, d.residual
    saved = 4 * h + 4  # the float32 input (a copy unless the stream is float32) and the inverse RMS
    if d.norm_trained:
        saved += d.residual * h  # the normalised input, for the weight's gradient
    return saved, max(d.norm_weight, d.residual)


def _attention(s: Setup, d: ActivationDtypes, kinds: dict[str, str]) -> tuple[float, float, float]:
    """Attention per token: (what the attention keeps, what o_proj keeps of its input, bytes per token
    and per position of the sequence)."""
    sh = s.shape
    c = d.c
    kv_saved = sh.kv_dim
    per_T = 0.0
    if s.attention == "sdpa" and s.padded:
        if sh.kv_dim < sh.q_dim:
            kv_saved = sh.q_dim  # transformers repeats k/v heads when SDPA gets a mask on CUDA
        per_T += c  # the boolean mask becomes a float bias (batch x 1 x T x T) that the kernel keeps
    attention = c * (sh.q_dim + 2 * kv_saved)  # q and k after the rotary embedding, v
    if s.attention == "eager":
        kv_saved = sh.q_dim
        attention = c * (sh.q_dim + 2 * kv_saved)
        per_T += (4 + c) * sh.heads  # float32 softmax output and its compute-dtype copy, per head
        return attention, _consumers(s, d, kinds, c, sh.q_dim, ["o_proj"], already_saved=False), per_T
    return (attention + c * sh.q_dim + 4 * sh.heads,  # + the output and the log-sum-exp
            _consumers(s, d, kinds, c, sh.q_dim, ["o_proj"], already_saved=True), per_T)


def _mlp(s: Setup, d: ActivationDtypes, kinds: dict[str, str], x_bytes: int) -> tuple[float, int]:
    """The MLP per token: (what its activation function and product keep, the bytes per element of the
    tensor down_proj reads)."""
    i = s.shape.mlp_width
    up = _out_bytes(d, kinds, "up_proj", x_bytes)
    if not s.shape.gated:
        return up * i, up  # the activation function keeps its input
    gate = _out_bytes(d, kinds, "gate_proj", x_bytes)
    # SiLU keeps its input, the product keeps both factors; Liger's SwiGLU recomputes the SiLU
    return ((gate + up) * i if s.liger else (2 * gate + up) * i), max(gate, up)


def layer_activation_bytes(s: Setup) -> dict[str, float]:
    """What autograd keeps for the backward pass of one decoder block, per token, by part.

    An RMSNorm keeps its input in float32 (and, when its weight is trained, the normalised input); a
    trained linear keeps its input in the compute dtype (a cast copy per layer when the input is in
    another dtype); a LoRA layer keeps its dropout mask and its adapter's input in the compute dtype;
    attention keeps q, k, v and its output (k and v for every query head when GQA meets a padding
    mask); the gated MLP keeps the gate's output, its SiLU and the up projection. ``per_token_T`` is
    multiplied by the sequence length (the float attention-mask bias that SDPA materialises from a
    padding mask, eager attention's scores).
    """
    d = activation_dtypes(s)
    sh = s.shape
    h, i = sh.hidden, sh.mlp_width
    kinds = module_kinds(s)
    norm, x_bytes = _norm(s, d)  # the same for the block's two norms
    parts: dict[str, float] = {}
    parts["norms"] = 2 * norm
    parts["attention_inputs"] = _consumers(s, d, kinds, x_bytes, h, ["q_proj", "k_proj", "v_proj"])
    parts["attention"], parts["attention_output"], per_T = _attention(s, d, kinds)
    mlp_in = ["gate_proj", "up_proj"] if sh.gated else ["up_proj"]
    parts["mlp_inputs"] = _consumers(s, d, kinds, x_bytes, h, mlp_in)
    parts["mlp"], product = _mlp(s, d, kinds, x_bytes)
    parts["mlp_output"] = _consumers(s, d, kinds, product, i, ["down_proj"])
    parts["per_token_T"] = per_T
    return parts


def per_token_layer(s: Setup) -> float:
    """Bytes one token keeps in one block (the ``per_token_T`` part times the sequence length)."""
    parts = layer_activation_bytes(s)
    return sum(v for k, v in parts.items() if k != "per_token_T") + parts["per_token_T"] * s.seq_len
