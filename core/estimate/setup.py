"""The memory model's input: :class:`Setup`, what one training step runs with (the model's shape, batch,
precision, training method, optimizer, reference and other models, DeepSpeed, processes, generation)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .shape import ModelShape


@dataclass
class Setup:
    """Every setting the memory of a training step depends on (resolved from a recipe; tests and
    suggestions build variants with ``dataclasses.replace``)."""

    stage: str
    shape: ModelShape
    rows: int  # sequences in one micro-batch on one device
    seq_len: int  # tokens per sequence
    scored_tokens: int  # tokens the LM head scores per micro-batch
    compute: str = "bfloat16"
    trained: str = "float32"
    method: str = "full"  # full | lora
    lora_r: int = 16
    lora_targets: tuple = ()
    lora_dropout: float = 0.0
    lora_extra: tuple = ()  # modules_to_save trained in full: 'lm_head', 'embed_tokens', 'score'
    quant_bits: int | None = None
    double_quant: bool = True
    checkpointing: bool = True
    liger: bool = False
    attention: str = "sdpa"  # sdpa | flash | eager
    padded: bool = True  # batches carry padding (an attention mask) — true of real pairs and completions
    dropout_mask_bytes: float = 1  # CUDA's fused dropout keeps a bool mask (on a CPU: the scaled noise itself)
    optim: str = "adamw_torch_fused"
    grad_accum: int = 1
    reference: str = "none"  # none | adapter | copy | precomputed
    reference_shape: ModelShape | None = None
    reference_dtype: str | None = None  # None: the compute dtype
    reward_models: tuple = ()  # (ModelShape, dtype) of frozen reward models (online)
    critic: tuple | None = None  # online with a critic: (ModelShape or None for the policy's base, lora_r, dtype)
    zero_stage: int | None = None  # DeepSpeed ZeRO stage, None without DeepSpeed
    zero: dict = field(default_factory=dict)  # the zero_optimization section
    processes: int = 1
    generation_rows: int = 0  # online: completions generated at once on this device
    prompt_len: int = 0
    completion_len: int = 0
    vllm_fraction: float = 0.0  # online with colocated vLLM: its share of the GPU
    unit: str = "sequences"  # what a row of the micro-batch is, in words
    generation_between_steps: bool = True  # online: generation falls between optimizer steps (no gradients held)
    gather_for_generation: bool = True  # online under ZeRO-3: full parameters gathered to generate
    notes: list = field(default_factory=list)
