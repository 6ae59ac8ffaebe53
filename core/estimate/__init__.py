"""``posttrain estimate``: peak GPU memory per device, predicted from a recipe and the model's ``config.json``.

Nothing is downloaded or loaded and torch is never imported (nor transformers, TRL or peft): the
model's shape comes from its ``config.json`` (a local folder, the local Hugging Face cache, or
posttrain's converted built-in model) and everything else from the recipe, TRL's config defaults
(read from TRL's source by :mod:`posttrain.trl_fields`) and the enabled plugins.

The estimate is a sum of terms, each a formula in the model's shape and the recipe's settings
(docs/estimate.md explains every one):

- stored weights: frozen weights in the compute dtype or 4/8-bit; trained weights in
  ``model.trained_dtype`` (float32 master weights by default); their gradients and the
  optimizer's state; a frozen reference copy; reward models; DDP/DeepSpeed buffers;
- activations: what autograd saves for the backward pass, per token and per decoder layer, read
  off the Llama block (norms, projections, rotary attention, gated MLP) under autocast, LoRA
  and checkpointing; these per-layer rules are checked against the bytes autograd really saves
  on a tiny Llama (tests/test_estimate.py);
- the fused LM head's buffers (TRL scores log-probs in tiles instead of materialising logits);
- generation's KV cache (online stage).

The peak is the largest of a few moments of a training step (the forward pass, either end of the
backward pass, the optimizer step, generation), plus an overhead for the CUDA context and the
caching allocator.

The modules, from the bottom up:

- :mod:`.constants`: the numbers the model uses (bytes per dtype, TRL's LM head tiles, bitsandbytes'
  blocks, overheads, DeepSpeed's buffer defaults, optimizers' state), each with where it comes from;
- :mod:`.shape`: :class:`ModelShape` and reading it from config.json (a folder, ``builtin:NAME``, the
  Hugging Face cache): :func:`read_shape`, :func:`config_path`, :func:`shape_from_config`;
- :mod:`.setup`: :class:`Setup`, every setting a training step's memory depends on;
- :mod:`.activations`: what autograd keeps per token per block (:func:`per_token_layer`);
- :mod:`.parameters`: LoRA and trained parameters, frozen and quantised weights, the critic, optimizer state;
- :mod:`.memory`: the memory model, :func:`compute` (a :class:`Setup` to an :class:`Estimate`: the
  :class:`Terms` of every moment of a step and the peak);
- :mod:`.suggest`: changes to try when a stage does not fit (:class:`Suggestion`);
- :mod:`.sizes`: ``--gpu-memory`` and ``--processes`` (:func:`parse_gpu_memory`, :func:`parse_processes`);
- :mod:`.from_recipe`: a recipe's stages to setups and estimates (:func:`estimate_recipe`,
  :func:`estimate_data`, :class:`StageReport`);
- :mod:`.report`: the text and JSON output (:func:`print_report`, :func:`report_json`).
"""

from .activations import layer_activation_bytes, per_token_layer
from .constants import GiB
from .from_recipe import StageInput, StageReport, estimate_data, estimate_recipe, setup_from_recipe
from .memory import Estimate, Terms, compute
from .report import describe_setup, print_report, report_json
from .setup import Setup
from .shape import ModelShape, config_path, read_shape, shape_from_config
from .sizes import parse_gpu_memory, parse_processes
from .suggest import Suggestion

__all__ = ["Estimate", "GiB", "ModelShape", "Setup", "StageInput", "StageReport", "Suggestion", "Terms", "compute",
           "config_path", "describe_setup", "estimate_data", "estimate_recipe", "layer_activation_bytes",
           "parse_gpu_memory", "parse_processes", "per_token_layer", "print_report", "read_shape", "report_json",
           "setup_from_recipe", "shape_from_config"]
