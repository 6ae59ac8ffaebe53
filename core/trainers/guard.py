"""What every posttrain trainer mixes in before its TRL base class (:class:`GuardedTrainer`): the
non-finite guard on every optimizer step, checkpoints marked complete once written, a failed save as a
user error, and the model card naming the plugins that trained."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import UserError
from .integrations import hub_errors, short_error


class NonFiniteTraining(UserError):
    """Training produced a non-finite loss or gradient norm; the weights were not updated with it."""

    keep_run_dir = True  # metrics.jsonl shows how the run got there


class FiniteGuard:
    """Watches every optimizer step of a trainer: the summed micro-batch losses and the gradient norm.

    It is checked where transformers has computed the gradient norm and not yet stepped the
    optimizer, so a non-finite step never reaches the weights. Under several processes the verdict
    is reduced over all of them (one scalar per step), so every rank stops at the same step.
    """

    def __init__(self):
        self.step_loss = None  # sum of this step's micro-batch losses (a tensor: no sync per micro-batch)
        self.last_finite: tuple[int, float, float | None] | None = None  # (step, loss, grad norm)

    def add_loss(self, loss) -> None:
        loss = loss.detach().float()
        self.step_loss = loss if self.step_loss is None else self.step_loss + loss

    def check(self, trainer, grad_norm) -> None:
        import torch

        step = trainer.state.global_step + 1
        loss = self.step_loss if self.step_loss is not None else torch.zeros((), device=trainer.args.device)
        self.step_loss = None
        norm = grad_norm if isinstance(grad_norm, torch.Tensor) else torch.tensor(
            float("nan") if grad_norm is None else float(grad_norm))
        if trainer.args.fp16:  # fp16's loss scaler skips overflowing steps itself: only the loss is ours to judge
            norm = torch.zeros(())
        values = torch.stack([loss.reshape(()).to(norm.device, torch.float32), norm.reshape(()).float()])
        bad = (~torch.isfinite(values)).any().float()
        if trainer.accelerator.num_processes > 1:
            bad = trainer.accelerator.reduce(bad.to(trainer.accelerator.device), reduction="sum")
        loss_value, norm_value = values.tolist()
        if grad_norm is None or trainer.args.fp16:
            norm_value = None
        if not bad.item():
            self.last_finite = (step, loss_value, norm_value)
            return
        raise self.error(trainer, step, loss_value, norm_value)

    def error(self, trainer, step: int, loss: float, norm: float | None) -> NonFiniteTraining:
        here = f"loss {loss:.6g}" + (f", gradient norm {norm:.6g}" if norm is not None else "")
        if self.last_finite is None:
            last = "no earlier step was finite in this session"
        else:
            s, l, n = self.last_finite
            last = f"the last finite step was {s} (loss {l:.6g}" + (f", gradient norm {n:.6g})" if n is not None else ")")
        from ..checkpoints import newest_complete

        checkpoint = newest_complete(Path(trainer.args.output_dir))
        kept = (f"the last checkpoint, {checkpoint.name}, is kept" if checkpoint is not None else
                "no checkpoint was written before it")
        resume = (f"--resume with the same recipe continues from {checkpoint.name} (a changed recipe is refused)"
                  if checkpoint is not None else "")
        local = all(math.isfinite(v) for v in (loss, norm) if v is not None)
        where = " here; another process had a non-finite one" if local else ""
        return NonFiniteTraining(
            f"training stopped at step {step}: non-finite values ({here}{where}); {last}. The weights were not "
            f"updated with step {step}; {kept}", field="training",
            fix="lower training.learning_rate, set training.max_grad_norm (e.g. 1.0), check the data and the reward "
                "sources; then start again with --overwrite" + (f", or {resume}" if resume else ""))


class SaveFailed(UserError):
    """A checkpoint could not be written (a full disk, no permission); the run stops, its folder kept."""

    keep_run_dir = True


class GuardedTrainer:
    """Mixed into every posttrain trainer (before its TRL base class): stops at the first non-finite
    loss or gradient norm, before the optimizer step, with a user error (exit 2); marks each checkpoint
    complete once all of it is written (posttrain.checkpoints); turns a failed save into a user error
    naming the folder and the free space."""

    def _save_extra(self, folder: Path) -> None:
        """What a trainer saves into a checkpoint besides TRL's files (the critic's state)."""

    def _run_epoch(self, *args, **kwargs):
        """transformers checks max_steps only after an optimizer step: a run resumed from a checkpoint at its
        last step (stopped after that save, before its summary) would train one step more than the same run
        uninterrupted. With nothing left to train, the epoch is not started."""
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        import shutil

        from ..checkpoints import mark_complete, newest_complete
        from ..process import barrier

        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
            self._save_extra(folder)
            barrier()  # every rank's files are written (DeepSpeed saves a shard per rank)
            if self.args.should_save:
                mark_complete(folder, self.state.global_step)
        except (OSError, RuntimeError) as e:
            # torch.save reports a write that failed half-way (a full disk) as a RuntimeError of its zip writer
            if isinstance(e, RuntimeError) and not any(w in str(e) for w in ("inline_container", "PytorchStreamWriter",
                                                                             "write", "No space")):
                raise
            try:
                free = f"{shutil.disk_usage(folder.parent).free / 2 ** 20:.1f} MiB free there"
            except OSError:
                free = "the free space could not be read"
            try:
                previous = newest_complete(folder.parent, say=lambda _: None)
            except UserError:
                previous = None
            kept = (f"the previous checkpoint, {previous.name}, is intact and --resume continues from it"
                    if previous is not None and previous != folder else "no earlier checkpoint was complete")
            raise SaveFailed(f"saving {folder} failed at step {self.state.global_step}: {type(e).__name__}: {e} "
                             f"({free}); {kept}", field="--output-dir",
                             fix="free space on that disk (or point --output-dir at a larger one, or raise "
                                 "training.save_steps / set training.save_total_limit), then run again with "
                                 "--resume") from None

    # -- the hub (push_to_hub): an upload that fails never ends the run --------------------------

    def init_hf_repo(self, token=None, private=None) -> None:
        """transformers creates the hub repository when the trainer is built: if the hub cannot be reached,
        training goes on (the upload is tried again at the end)."""
        try:
            super().init_hf_repo(token=token, private=private)
        except hub_errors() as e:
            self.hub_model_id = None
            print(f"posttrain: warning: the hub repository could not be created ({short_error(e)}); training goes "
                  "on and the upload is tried again at the end", flush=True)

    def _push_from_checkpoint(self, checkpoint_folder) -> None:
        """A checkpoint's upload (hub_strategy): skipped without a hub repository; a failure is said, not raised."""
        if getattr(self, "hub_model_id", None) is None:
            return
        try:
            super()._push_from_checkpoint(checkpoint_folder)
        except hub_errors() as e:
            print(f"posttrain: warning: uploading {Path(checkpoint_folder).name} to the hub failed "
                  f"({short_error(e)}); training goes on", flush=True)

    def push_to_hub(self, *args, **kwargs):
        """The upload at the end (transformers pushes when the final model is saved): a failure, creating the
        repository included, is recorded in ``hub_upload`` (run_training says it); the model stays in the run
        directory."""
        try:
            if getattr(self, "hub_model_id", None) is None:  # not created when the trainer was built
                super().init_hf_repo(token=kwargs.get("token"), private=kwargs.get("private"))
            result = super().push_to_hub(*args, **kwargs)
        except hub_errors() as e:
            self.hub_upload = {"uploaded": False, "repo": self.args.hub_model_id, "error": short_error(e)}
            return None
        self.hub_upload = {"uploaded": True, "repo": getattr(self, "hub_model_id", None)}
        return result

    def _finite_guard(self) -> FiniteGuard:
        if getattr(self, "_posttrain_finite", None) is None:
            self._posttrain_finite = FiniteGuard()
        return self._posttrain_finite

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._finite_guard().add_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self._finite_guard().check(self, grad_norm)
        return grad_norm

    # TRL's method whose paper the model card (the README.md TRL writes into the run directory) cites, for
    # the plugins that are that method
    _METHOD_OF_TRAINER = {"preference": ("posttrain_preference_loss", "dpo"),
                          "iterative": ("posttrain_preference_loss", "dpo"),
                          "online": ("posttrain_advantage_estimate", "group_relative")}

    def create_model_card(self, *args, **kwargs):
        """TRL's model card, naming what trained the model: posttrain's stage on TRL's trainer, the plugin
        that owns the loss or advantage, the enabled plugins (TRL's own says e.g. "trained with DPO" whatever
        the loss was); TRL's method paper is cited only when the plugins are that method."""
        plugins = getattr(self, "plugins", None)
        if plugins is None:
            return super().create_model_card(*args, **kwargs)
        stage = getattr(self, "stage", "?")
        hook, same = self._METHOD_OF_TRAINER.get(stage, (None, None))
        owner = (plugins.implementers(hook) or [None])[0] if hook else None
        parts = [f"loss: {owner}" if hook == "posttrain_preference_loss" else
                 f"advantage: {owner}" if hook else None,
                 f"plugins: {', '.join(plugins.by_name) or 'none'}"]
        trl_class = next((c.__name__ for c in type(self).__mro__ if c.__module__.startswith("trl.")), "trainer")
        name = (f"posttrain's {stage} stage on TRL's {trl_class} ("
                + "; ".join(p for p in parts if p) + ")")
        saved = self._name, self._paper
        self._name = name
        if hook is not None and owner != same:
            self._paper = {}
        try:
            return super().create_model_card(*args, **kwargs)
        finally:
            self._name, self._paper = saved
