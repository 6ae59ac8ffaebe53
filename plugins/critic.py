"""A learned critic for PPO in the online stage: V(x, y_<t), a scalar value head read at every
completion token, trained alongside the policy on the value targets of the advantage estimator
(``gae``).

Two ways to get one (option ``model``):

- ``model: policy`` (the default): the policy's own frozen base with a second LoRA adapter,
  ``critic``, and a value head. No second copy of the base is held: the critic adds only its
  adapter and its head (a LoRA policy is needed). Its forward passes switch the base to the
  critic's adapter and back.
- ``model: PATH`` or ``stages.NAME``: a separate value model initialised from a reward model (as
  InstructGPT and the DPO-vs-PPO study do): a sequence classifier with one label (the
  reward_model stage's output), whose body and head become V. It must share the policy's tokenizer.
  It trains through its own LoRA adapter (``lora_r`` > 0, its head in full) or all of its weights
  (``lora_r: 0``; float32 master weights). ``normalize`` puts its outputs on the scale of a
  normalised ``reward_model`` source, V = (head − mean) / std, so its values start where the
  returns are (give it the same ``normalize`` as the reward source). Its value at a completion's
  last token is read where the reward model reads its score of that completion (the reply closed
  as the reward model's inputs close it: the chat template's end of turn for chat prompts, EOS for
  plain ones; the last token that is not padding), in every format, ended or truncated: at the
  start its last values equal the reward model's scores of the same completions. Its other values
  are the states before each completion token, as for the LoRA critic.

The loss is PPO's clipped value loss on the completion tokens,

    L_V = vf_coef · ½ · mean_t max( (V_t − G_t)², (V_old,t + clip(V_t − V_old,t, −c, c) − G_t)² )

with c = ``cliprange_value`` (unclipped: ``cliprange_value: null``), V_old the values at sampling
time and G the targets. The critic has its own AdamW optimiser (``learning_rate``, gradient
clipping at ``max_grad_norm``, constant rate) and steps after each policy optimizer step; its
gradients are averaged over processes, and every process starts from the main process's weights.
Its state (trained weights and optimiser) is saved in every checkpoint (``checkpoint-N/critic.pt``)
and restored by ``--resume``.

Under DeepSpeed, a value model is a DeepSpeed engine of its own, with the policy's ZeRO stage (under
ZeRO-3 its weights, gradients and optimiser state are sharded over the processes): the engine
back-propagates each micro-batch's value loss into the value model's own ``.grad`` (no parameter of
the policy's is involved), averages the gradients, clips them and steps at the accumulation boundary,
and writes its ZeRO checkpoint into ``checkpoint-N/critic/``.

Otherwise the critic's gradients never touch a parameter's ``.grad``: each micro-batch's value loss is
differentiated with ``torch.autograd.grad`` with respect to the critic's own parameters only, while
they are trainable (the critic's adapter is active), and accumulated in the critic's buffers until
its step. So the policy's gradient clipping and optimizer never see them, and the policy's loss
never reaches the critic.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from posttrain import Critic, Plugin, UserError, hookimpl
from posttrain.classifier import check_normalize, normalization

CRITIC_ADAPTER = "critic"
ENGINE_FOLDER = "critic"  # a DeepSpeed critic's checkpoint: checkpoint-N/critic/critic/


def clipped_value_loss(values, old_values, targets, mask, clip: float | None):
    """½ · masked mean of max((V − G)², (V_clipped − G)²); without ``clip``, of (V − G)². Also the share
    of tokens where the clipped term is the larger one."""
    import torch

    mask = mask.to(values.dtype)
    unclipped = (values - targets) ** 2
    if clip is None:
        loss, clipped_share = unclipped, torch.zeros((), device=values.device)
    else:
        clipped = (old_values + (values - old_values).clamp(-clip, clip) - targets) ** 2
        loss = torch.maximum(unclipped, clipped)
        clipped_share = ((clipped > unclipped).to(values.dtype) * mask).sum() / mask.sum().clamp(min=1)
    return 0.5 * (loss * mask).sum() / mask.sum().clamp(min=1), clipped_share


class _CriticBase(Critic):
    """The optimiser, the loss, the gradient averaging and the checkpoint format both critics share."""

    def __init__(self, options):
        self.options = options
        self.trainer = None
        self.optimizer = None
        self.engine = None  # the critic's own DeepSpeed engine, when the policy trains under DeepSpeed
        self._grads = None  # the value loss's gradients accumulated since the last step, one per parameter
        self.last_grad_norm = None

    def trained_parameters(self) -> list:
        raise NotImplementedError

    def forward(self, input_ids, attention_mask, logits_to_keep: int):
        raise NotImplementedError

    def _make_optimizer(self):
        import torch

        params = self.trained_parameters()
        for p in params:
            p.data = p.data.float()  # float32 master weights
        self.optimizer = torch.optim.AdamW(params, lr=self.options.learning_rate, weight_decay=0.0)

    def _same_on_every_process(self):
        """Start every process's critic from the main process's weights, as DDP does for a model it wraps (and a
        DeepSpeed engine at its creation). A new LoRA adapter or value head is drawn from each process's own
        random state, and replicas started apart stay apart: their averaged gradients do not bring them
        together."""
        import torch.distributed as dist

        if self.engine is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in self.trained_parameters():
                dist.broadcast(p.data, src=0)

    def active(self):
        """The context in which the critic's parameters are trainable and its forward pass runs."""
        return contextlib.nullcontext()

    def values(self, input_ids, attention_mask, logits_to_keep: int):
        import torch

        with torch.no_grad(), self.active():
            return self.forward(input_ids, attention_mask, logits_to_keep).detach()

    def train_on(self, input_ids, attention_mask, logits_to_keep, targets, old_values, mask, scale: float) -> dict:
        import torch

        valid = mask.bool() & ~torch.isnan(targets)
        targets = torch.nan_to_num(targets, nan=0.0)
        params = self.trained_parameters()
        with self.active():
            values = self.forward(input_ids, attention_mask, logits_to_keep)
            loss, clipped = clipped_value_loss(values, old_values.to(values.dtype), targets.to(values.dtype), valid,
                                               self.options.cliprange_value)
            metrics = {"critic/value_loss": loss.detach(), "critic/clipped_share": clipped.detach()}
            if self.engine is not None:  # DeepSpeed: the engine scales by its accumulation steps, reduces and steps
                self.engine.backward(self.options.vf_coef * loss)
                self.engine.step()  # an optimizer step only at the accumulation boundary, as accelerate does
                return metrics
            # Gradients of the critic's parameters only, kept out of every .grad (see the module's docstring).
            grads = torch.autograd.grad(self.options.vf_coef * loss * scale, params, allow_unused=True)
        if self._grads is None:
            self._grads = [None] * len(params)
        for i, g in enumerate(grads):
            if g is not None:
                g = g.to(params[i].dtype)
                self._grads[i] = g if self._grads[i] is None else self._grads[i] + g
        return metrics

    def step(self) -> None:
        """One AdamW step on the accumulated gradients (averaged over processes, clipped at max_grad_norm)."""
        import torch

        if self.engine is not None:  # the engine stepped at the boundary of train_on's micro-batches
            norm = self.engine.get_global_grad_norm()
            self.last_grad_norm = None if norm is None else float(norm)
            return
        if self._grads is None:
            return
        params = self.trained_parameters()
        accelerator = self.trainer.accelerator
        for p, g in zip(params, self._grads, strict=True):
            p.grad = None if g is None else (accelerator.reduce(g, reduction="mean")
                                             if accelerator.num_processes > 1 else g)
        with_grad = [p for p in params if p.grad is not None]
        if with_grad:
            norm = torch.nn.utils.clip_grad_norm_(with_grad, self.options.max_grad_norm or float("inf"))
            self.last_grad_norm = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._grads = None

    def save(self, folder) -> None:
        """Called on every process. A DeepSpeed critic saves its engine's checkpoint (``critic/``, a shard of
        the weights and the optimizer per process under ZeRO-3); otherwise the main process writes
        ``critic.pt``."""
        import torch

        if self.engine is not None:
            self.engine.save_checkpoint(str(Path(folder) / ENGINE_FOLDER), tag=ENGINE_FOLDER)
            return
        if not self.trainer.is_world_process_zero():
            return
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save({"weights": [p.detach().cpu() for p in self.trained_parameters()],
                    "optimizer": self.optimizer.state_dict()}, Path(folder) / "critic.pt")

    def load(self, folder) -> None:
        import torch

        if self.engine is not None:
            if not (Path(folder) / ENGINE_FOLDER / ENGINE_FOLDER).is_dir():
                raise UserError(f"the checkpoint '{folder}' has no DeepSpeed critic state ({ENGINE_FOLDER}/)",
                                field="plugins.critic", fix="resume with the launch (DeepSpeed or not) and the critic "
                                                            "settings the run started with")
            loaded, _ = self.engine.load_checkpoint(str(Path(folder) / ENGINE_FOLDER), tag=ENGINE_FOLDER,
                                                    load_optimizer_states=True, load_lr_scheduler_states=False)
            if loaded is None:
                raise UserError(f"the critic's DeepSpeed state in '{folder}' could not be read",
                                field="plugins.critic", fix="resume from an earlier checkpoint")
            return
        if not (Path(folder) / "critic.pt").is_file():
            raise UserError(f"the checkpoint '{folder}' has no critic state (critic.pt)", field="plugins.critic",
                            fix="resume with the launch (DeepSpeed or not) and the critic settings the run started "
                                "with")
        state = torch.load(Path(folder) / "critic.pt", map_location="cpu", weights_only=True)
        params = self.trained_parameters()
        if len(state["weights"]) != len(params):
            raise UserError(f"the checkpoint's critic has {len(state['weights'])} tensors, this one {len(params)}",
                            field="plugins.critic", fix="resume with the critic settings the run started with")
        with torch.no_grad():
            for p, saved in zip(params, state["weights"], strict=True):
                p.copy_(saved.to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])

    @staticmethod
    def _states_before_tokens(hidden, logits_to_keep: int):
        """Hidden states of the positions that predict the last ``logits_to_keep`` tokens: the state
        before each completion token (the same alignment as TRL's per-token log-probs)."""
        return hidden[:, -logits_to_keep - 1:-1]


class SharedBaseCritic(_CriticBase):
    """A second LoRA adapter on the policy's frozen base, plus a value head."""

    def setup(self, trainer) -> None:
        import torch
        from accelerate.utils import is_peft_model
        from peft import LoraConfig

        self.trainer = trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        if not is_peft_model(model):
            raise UserError("the critic on the policy's base (model: policy) needs a LoRA policy",
                            field="plugins.critic.model",
                            fix="add model.lora to the recipe, or give the critic a model of its own (a reward model "
                                "folder or stages.NAME)")
        self.policy = model
        policy_config = model.peft_config["default"]
        if CRITIC_ADAPTER not in model.peft_config:
            model.add_adapter(CRITIC_ADAPTER, LoraConfig(
                r=self.options.lora_r, lora_alpha=2 * self.options.lora_r, lora_dropout=0.0,
                target_modules=policy_config.target_modules, task_type="CAUSAL_LM"))
            model.set_adapter("default")
        self.adapter_params = [p for n, p in model.named_parameters() if f".{CRITIC_ADAPTER}." in n]
        hidden = model.get_base_model().config.get_text_config().hidden_size
        device = next(model.parameters()).device
        torch.manual_seed(trainer.args.seed)
        self.head = torch.nn.Linear(hidden, 1, device=device, dtype=torch.float32)
        torch.nn.init.zeros_(self.head.weight), torch.nn.init.zeros_(self.head.bias)  # V = 0 at the start
        self._make_optimizer()
        self._same_on_every_process()

    def trained_parameters(self) -> list:
        return [*self.adapter_params, *self.head.parameters()]

    @contextlib.contextmanager
    def active(self):
        """Run the base with the critic's adapter, trainable; the policy's adapter and every requires_grad
        flag come back on exit. The critic's value loss is differentiated inside (train_on): a parameter
        frozen between its forward and backward pass would get no gradient."""
        model = self.policy
        flags = [(p, p.requires_grad) for p in model.parameters()]
        active = model.active_adapter
        model.set_adapter(CRITIC_ADAPTER)
        for p in self.adapter_params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            model.set_adapter(active)
            for p, flag in flags:
                p.requires_grad_(flag)

    def forward(self, input_ids, attention_mask, logits_to_keep: int):
        """V per completion token; runs inside :meth:`active`."""
        inner = self.policy.get_base_model()
        backbone = getattr(inner, inner.base_model_prefix)
        with self.trainer.accelerator.autocast():
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(self._states_before_tokens(hidden, logits_to_keep).float()).squeeze(-1)


class ValueModelCritic(_CriticBase):
    """A separate value model initialised from a reward model (its body and its scalar head)."""

    def setup(self, trainer) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from posttrain.models import resolve_model_path, torch_dtype, whole_models

        self.trainer = trainer
        path = resolve_model_path(self.options.model)
        precision = trainer.precision
        full = self.options.lora_r == 0
        try:
            with whole_models():  # built whole; under DeepSpeed its own engine then shards it (ZeRO-3)
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=1, dtype=torch_dtype(precision.trained if full else precision.compute))
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the critic's value model '{path}': {str(e).splitlines()[0]}",
                            field="plugins.critic.model", fix="point at a reward model (a reward_model stage's "
                                                              "merged/ output, or stages.NAME)") from None
        if tokenizer.get_vocab() != trainer.processing_class.get_vocab():
            raise UserError(f"the value model '{path}' has another tokenizer than the policy",
                            field="plugins.critic.model",
                            fix="initialise the critic from a reward model trained from the policy's family (e.g. a "
                                "reward_model stage of the same pipeline)")
        model.config.pad_token_id = trainer.processing_class.pad_token_id
        if not full:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=self.options.lora_r, lora_alpha=2 * self.options.lora_r,
                                                     lora_dropout=0.0, target_modules="all-linear",
                                                     task_type="SEQ_CLS"))
        self.model = model.to(trainer.accelerator.device).train()
        self.shift, self.scale = normalization(self.options.model, self.options.normalize)
        self.pad_id = model.config.pad_token_id
        self.eos_id = trainer.processing_class.eos_token_id
        self.suffix = reply_suffix(trainer.processing_class, _conversational(trainer.train_dataset))
        self._make_optimizer()
        if trainer.is_deepspeed_enabled:
            self._make_engine()  # the engine starts every process from the main process's weights
        else:
            self._same_on_every_process()

    def _make_engine(self):
        """The value model as a DeepSpeed engine of its own, with the ZeRO stage of the policy's: sharded under
        ZeRO-3 (weights, gradients, optimizer state), gradients and optimizer state sharded under ZeRO-2.
        Its optimizer is the critic's AdamW; the engine reduces the gradients over the processes, clips
        them at max_grad_norm and saves and loads the critic's checkpoints."""
        import deepspeed

        trainer = self.trainer
        args = trainer.args
        policy = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
        zero = {k: v for k, v in (policy.get("zero_optimization") or {}).items() if v != "auto"}
        config = {
            "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
            * trainer.accelerator.num_processes,
            "gradient_clipping": float(self.options.max_grad_norm or 0.0),
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,  # torch's AdamW, the critic's own
            "zero_force_ds_cpu_optimizer": False,
            "bf16": {"enabled": bool(args.bf16)},
            "fp16": {"enabled": bool(args.fp16)},
            "steps_per_print": 2 ** 31,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer,
                                                                config=config)
        self.model = self.engine.module

    def engine_facts(self) -> dict | None:
        """What the critic's engine holds on this process: its ZeRO stage, and how many of its parameters are
        only a shard here (a partition smaller than the whole tensor)."""
        if self.engine is None:
            return None
        params = list(self.model.parameters())
        sharded = [p for p in params if hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel]
        return {"zero_stage": self.engine.zero_optimization_stage(), "parameters": len(params),
                "sharded": len(sharded), "trainable_sharded": sum(p.requires_grad for p in sharded)}

    def trained_parameters(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, input_ids, attention_mask, logits_to_keep: int):
        """V before each completion token; at the last one, where the reward model reads its score."""
        import torch

        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        backbone = getattr(inner, inner.base_model_prefix)
        ids, mask, reads, lengths = closed_replies(input_ids, attention_mask, logits_to_keep, self.suffix,
                                                   self.eos_id, self.pad_id)
        with self.trainer.accelerator.autocast():
            hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            prompt = input_ids.shape[1] - logits_to_keep
            before = hidden[:, prompt - 1:prompt - 1 + logits_to_keep]  # the state before each completion token
            rows = torch.arange(ids.shape[0], device=ids.device)
            values = inner.score(before).squeeze(-1).float()
            last = inner.score(hidden[rows, reads]).squeeze(-1).float()
        ended = lengths > 0
        values = values.clone()
        values[rows[ended], (lengths[ended] - 1)] = last[ended]
        return (values - self.shift) / self.scale  # on the normalised reward's scale


def _conversational(dataset) -> bool:
    """Whether the stage's prompts are message lists (chat) rather than text."""
    if dataset is None or len(dataset) == 0:
        return False
    return isinstance(dataset[0].get("prompt"), list)


def reply_suffix(tokenizer, chat: bool) -> list[int]:
    """The tokens a reward model's input has after the reply's text: what the chat template writes after
    an assistant message (e.g. ``<|im_end|>`` and a newline), or EOS for plain text (posttrain's reward
    sources and TRL's RewardTrainer close a reply that way)."""
    if not chat:
        return [tokenizer.eos_token_id]
    mark = "\u2063REPLY\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": mark}],
                                         tokenize=False)
    tail = text[text.rindex(mark) + len(mark):]
    return tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []


def closed_replies(input_ids, attention_mask, logits_to_keep: int, suffix: list[int], eos_id: int, pad_id):
    """The sequences with each completion closed as a reward model's input closes it (its final EOS, if
    any, replaced by ``suffix``), right-padded, and per row the position a sequence classifier reads (the
    last token that is not ``pad_id``) and the completion's length. The tokens before each completion's
    last token are unchanged, and so are the states before each completion token."""
    import torch

    n, width = input_ids.shape
    prompt = width - logits_to_keep
    completion, kept = input_ids[:, prompt:], attention_mask[:, prompt:].bool()
    lengths = kept.long().sum(1)
    pad = pad_id if pad_id is not None else eos_id
    ids = torch.full((n, width + len(suffix)), pad, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(ids, dtype=attention_mask.dtype)
    ids[:, :prompt], mask[:, :prompt] = input_ids[:, :prompt], attention_mask[:, :prompt]
    tail = torch.tensor(suffix, dtype=input_ids.dtype, device=input_ids.device)
    reads = torch.zeros(n, dtype=torch.long, device=input_ids.device)
    for i in range(n):
        length = int(lengths[i])
        content = completion[i, :length]
        if length and int(content[-1]) == eos_id:
            content = content[:-1]
        row = torch.cat([content, tail])
        ids[i, prompt:prompt + len(row)] = row
        mask[i, prompt:prompt + len(row)] = 1
        real = torch.nonzero((ids[i] != pad) & mask[i].bool()).flatten()
        reads[i] = real[-1] if len(real) else prompt + len(row) - 1
    return ids, mask, reads, lengths


class CriticPlugin(Plugin):
    name = "critic"
    description = "a learned value function V(x, y_<t) trained with the policy (PPO): LoRA on the policy's base, or a " \
                  "value model initialised from a reward model"
    stages = ("online",)
    needs = ("value_targets",)  # an advantage estimator that returns the returns it learns (gae)

    @dataclass
    class Options:
        model: str = field(default="policy", metadata={
            "help": "'policy': a LoRA adapter on the policy's own frozen base (no second copy); or a reward model "
                    "(folder, hub id, stages.NAME) whose body and head become the value model."})
        learning_rate: float = field(default=1e-4, metadata={
            "help": "The critic's own learning rate (AdamW); 1e-4 fitted the returns best in bench/critic_fit.py."})
        cliprange_value: Union[float, None] = field(default=0.2, metadata={
            "help": "Clip the value update to ±c around the values at sampling time (null: unclipped)."})
        vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
        lora_r: int = field(default=16, metadata={
            "help": "Rank of the critic's LoRA adapter; with a value model, 0 trains all of its weights."})
        max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping of the critic (0: none)."})
        normalize: Union[Literal["heldout"], dict[str, float], None] = field(default=None, metadata={
            "help": "A value model's scores as the reward_model source normalises them, so V starts on the reward's "
                    "scale: null (raw), {mean, std}, or heldout (the model's reward_stats.json)."})

        def validate(self):
            if self.learning_rate <= 0 or self.vf_coef <= 0:
                raise ValueError("learning_rate and vf_coef must be positive")
            if self.cliprange_value is not None and self.cliprange_value <= 0:
                raise ValueError("cliprange_value must be positive (or null for an unclipped value loss)")
            if self.lora_r < 0 or (self.model == "policy" and self.lora_r == 0):
                raise ValueError("lora_r must be > 0 for the critic on the policy's base (>= 0 for a value model)")
            if self.normalize is not None and self.model == "policy":
                raise ValueError("normalize applies to a value model initialised from a reward model, not to "
                                 "model: policy (its head starts at zero)")
            check_normalize(self.model, self.normalize)
            local = self.model.startswith((".", "/", "~")) or Path(self.model).expanduser().exists()
            if self.model not in ("policy",) and local and not (Path(self.model).expanduser() / "config.json").is_file():
                raise ValueError(f"model '{self.model}' is not a model folder (no config.json)")

    @hookimpl
    def posttrain_critic(self, stage):
        return (SharedBaseCritic if self.options.model == "policy" else ValueModelCritic)(self.options)
