"""The numbers the memory model uses, each with where it comes from: bytes per dtype, TRL's fused LM head
tiles, bitsandbytes' 4-bit blocks, the CUDA context and allocator overhead, DeepSpeed's buffer defaults and
the state each ``training.optim`` keeps."""

GiB = 2 ** 30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# TRL's fused LM head (trl/kernels/chunked_logprob.py, TRL 1.16): tiles of TOKEN_CHUNK_SIZE tokens
# x _CHUNKED_LOGPROB_CHUNK_SIZE vocabulary entries in the compute dtype; the backward accumulates the
# hidden-state gradient (and the head's weight gradient when it is trained) in float32.
HEAD_TOKEN_TILE = 4096
HEAD_VOCAB_TILE = 32768

# bitsandbytes 4-bit: blocks of 64 weights share one absmax constant (float32; with double
# quantisation an 8-bit constant plus one float32 per 256 blocks).
NF4_BLOCK = 64
NF4_SECOND_BLOCK = 256

# peft's prepare_model_for_kbit_training (which core/models.py calls for every quantised model)
# casts every parameter that is not 4/8-bit, embeddings and lm_head included, to float32. The
# residual stream then runs in float32 too (the embedding's output is float32 and bitsandbytes
# layers return their input's dtype). The 7B QLoRA calibration figure agrees (docs/estimate.md).
KBIT_UPCASTS_UNQUANTISED = True

# Outside max_memory_allocated: the CUDA context (kernels, cuBLAS handles; about 0.5 GiB with
# torch's lazy module loading) and what the caching allocator holds but has not handed out
# (fragmentation; typically a few percent of the peak). Rules of thumb, not calibrated here.
CUDA_CONTEXT_GIB = 0.5
ALLOCATOR_SLACK = 0.05
NCCL_BUFFERS_GIB = 0.5  # communication buffers when several processes train together

# DeepSpeed's defaults for the buckets it allocates (deepspeed/runtime/zero/config.py) and the
# values the Hugging Face integration puts where a config says "auto".
DS_REDUCE_BUCKET = 500_000_000
DS_PREFETCH_BUCKET = 50_000_000
DS_MAX_LIVE_PARAMETERS = 1_000_000_000

# training.optim: (states per trained parameter, bytes per state or None for the trained dtype's,
# what is assumed). transformers' default with torch >= 2.8 is adamw_torch_fused.
OPTIMIZERS = {
    "adamw_torch_fused": (2, None, ""),
    "adamw_torch": (2, None, "foreach AdamW: one temporary the size of a state during the step"),
    "adamw_torch_xla": (2, None, ""),
    "adamw_apex_fused": (2, None, ""),
    "adamw_anyprecision": (2, None, ""),
    "adamw_bnb_8bit": (2, 1, "8-bit AdamW (bitsandbytes): one byte per state"),
    "adamw_8bit": (2, 1, "8-bit AdamW (bitsandbytes): one byte per state"),
    "adamw_torch_8bit": (2, 1, "8-bit AdamW (torchao): one byte per state"),
    "adamw_torch_4bit": (2, 0.5, "4-bit AdamW (torchao): half a byte per state"),
    "paged_adamw_32bit": (2, 4, "paged AdamW: counted on the GPU, but bitsandbytes pages it to CPU memory when "
                                "the GPU is full"),
    "paged_adamw_8bit": (2, 1, "paged 8-bit AdamW: counted on the GPU, but bitsandbytes pages it to CPU memory "
                               "when the GPU is full"),
    "lion_32bit": (1, 4, ""), "lion_8bit": (1, 1, ""), "paged_lion_32bit": (1, 4, ""), "paged_lion_8bit": (1, 1, ""),
    "sgd": (0, None, "SGD without momentum: no state"),
    "adagrad": (1, None, ""), "rmsprop": (1, None, ""),
    "adafactor": (0, None, "Adafactor: factored second moments, negligible state"),
}
FOREACH_TEMPORARY = {"adamw_torch"}  # optimizers that allocate a temporary the size of a state in the step
