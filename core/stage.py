"""The stage contract: one kind of training (or sampling) run, declared in one object.

A stage is to the core what a plugin is to a stage: a class in one module of ``posttrain.stages``
with a ``name``, an ``Options`` dataclass for the recipe keys that only it reads (checked like a
plugin's options, errors naming ``stages[i].KEY``), the data layouts it accepts, the hooks it calls,
its own checks of a validated plan, the facts ``posttrain estimate`` needs, the rows of its summary,
and ``run``, which trains and returns a :class:`StageResult`. Everything here is plain data: no
torch. ``run`` imports the stage's trainer module (``posttrain.trainers.*``) when it is called: a stage on
one TRL trainer only names it (``posttrain.stages.trainer_stage``).

Every recipe is a pipeline of stages once loaded (``posttrain.runner``): a one-stage recipe is a
pipeline of one stage whose run directory is the recipe's own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover - for editors and type checkers only
    from .recipe import Recipe

# The contract imports nothing above it, not even for types: a stage's plan is posttrain.validate.Plan and
# its plugins a posttrain.plugin_set.PluginSet (both built from this module's declarations).
Plan = Any
PluginSet = Any


@dataclass(frozen=True)
class TRLConfig:
    """A TRL config class located by its source file, with its bases (most derived first), so that its
    fields are read without importing it (``posttrain.trl_fields``)."""

    chain: tuple  # ((package, file inside the package, class name), ...)

    @property
    def name(self) -> str:
        return self.chain[0][2]


BASES = (("trl", "trainer/base_config.py", "_BaseConfig"), ("transformers", "training_args.py", "TrainingArguments"))


def trl_config(package: str, path: str, name: str) -> TRLConfig:
    """The TRL config class ``name`` defined in ``package/path``, on TRL's and transformers' bases."""
    return TRLConfig(((package, path, name), *BASES))


# TRL config fields that posttrain owns in every stage: setting them under `training` would be silently
# ignored or would fight a plugin, so the recipe is refused with the right place to say it.
COMMON_MANAGED = {
    "output_dir": "use the recipe's top-level output_dir or `posttrain run --output-dir`",
    "seed": "use the recipe's top-level seed",
    "model_init_kwargs": "use the recipe's model section",
    "trust_remote_code": "use model.trust_remote_code",
    "sync_ref_model": "the reference update is a plugin: enable one implementing posttrain_update_reference "
                      "(e.g. ref_ema)",
    "ref_model_mixup_alpha": "the reference update is a plugin: set plugins.ref_ema.eta",
    "ref_model_sync_steps": "the reference update is a plugin: set plugins.ref_ema.every",
    "bf16": "set model.dtype: bfloat16 (the compute dtype; trained weights stay float32 masters)",
    "fp16": "set model.dtype: float16 (the compute dtype; trained weights stay float32 masters)",
}

# Fields that older transformers/TRL versions had (or that another stage has), with what to write instead.
COMMON_RENAMED = {
    "warmup_ratio": "use warmup_steps: a float below 1 is a ratio of the total steps (e.g. warmup_steps: 0.1)",
    "evaluation_strategy": "use eval_strategy",
}

# The hooks every training stage calls while its recipe is validated and its trainer built (the stages with a
# reference model also call posttrain_reference_needed). All are supporting hooks (hookspecs.SUPPORTING_HOOKS).
SETUP_HOOKS = ("posttrain_trl_config", "posttrain_callbacks", "posttrain_required_columns", "posttrain_check_record",
           "posttrain_transform_dataset")


@dataclass
class MemoryFacts:
    """What a stage tells ``posttrain estimate`` about one training step on one device."""

    rows: int  # sequences in one micro-batch
    seq_len: int  # tokens per sequence
    scored_tokens: int  # tokens the LM head scores per micro-batch (0: a scalar head)
    reference: str = "none"  # none | adapter | copy | precomputed
    reward_head: bool = False  # the model is a sequence classifier (a scalar head instead of the LM head)
    generation_rows: int = 0  # completions generated at once (online)
    prompt_len: int = 0
    completion_len: int = 0
    generation_between_steps: bool = True  # generation falls between optimizer steps (no gradients held)
    gather_for_generation: bool = True  # under ZeRO-3, full parameters gathered to generate
    vllm_fraction: float = 0.0  # a colocated vLLM engine's share of the GPU
    unit: str = "sequences"  # what a row of the micro-batch is, in words ("completions", "sequences (2 per pair)")
    notes: list = field(default_factory=list)


def sequence_facts(cfg: dict, max_positions: int | None, rows_per_example: int, scored: bool = True) -> MemoryFacts:
    """A micro-batch of whole sequences cut at max_length (``rows_per_example`` sequences per example: 2 for a
    pair), as the sft, reward_model, preference and kto stages batch them."""
    notes = []
    max_length = cfg.get("max_length")
    if max_length is None:
        max_length = max_positions or 4096
        notes.append(f"training.max_length is null (no truncation): assumed the model's longest, {max_length}")
    rows = rows_per_example * int(cfg.get("per_device_train_batch_size") or 8)
    unit = "sequences" if rows_per_example == 1 else f"sequences ({rows_per_example} per pair)"
    return MemoryFacts(rows=rows, seq_len=int(max_length), scored_tokens=rows * int(max_length) if scored else 0,
                       unit=unit, notes=notes)


@dataclass(frozen=True)
class Panel:
    """One panel `posttrain compare` draws for runs of a stage, on the step axis (a pipeline's stages one
    after another, an iterative stage's rounds one after another):

    - ``curve``: ``metrics.jsonl`` keys per logged step (a second key is drawn dashed; with ``split``, a key
      pattern such as ``rewards/*/mean`` gives one panel per key it matches, so scales never mix);
    - ``heldout``: a held-out number of ``summary.json`` (``keys = (group, key)``, e.g. ``("heldout",
      "pairwise_accuracy")``), before (at the stage's first step) and after (at its last);
    - ``rounds``: a number per round of an iterative stage (``keys = (path,)`` into each round's record, e.g.
      ``"answers.answer_accuracy"``), at the round's last step;
    - ``summary``: a number of ``summary.json`` (``keys = (path,)``), at the stage's last step.
    """

    name: str
    title: str
    keys: tuple
    kind: str = "curve"
    split: bool = False


ANSWER_PANEL = Panel("answer_accuracy", "greedy answer accuracy (held out)", ("answers", "answer_accuracy"), "heldout")


@dataclass
class StageResult:
    """What a stage's run returns to the runner."""

    summary: dict  # what the stage's summary.json holds
    model: Path | None  # the model a following stage starts from (None: the stage's own `output`)
    dataset: Path | None = None  # a dataset written for later stages (``data.source: stages.NAME``)


class Stage:
    """Base class of the stages. Subclasses set the class attributes and implement :meth:`run`; a stage that
    trains one run of one TRL trainer subclasses :class:`posttrain.stages.trainer_stage.TrainerStage` instead,
    which names its trainer module and has the run."""

    name: ClassVar[str] = ""
    about: ClassVar[str] = ""  # one line for the docs and `posttrain validate`
    trainer: ClassVar[str] = ""  # the TRL trainer its trainer subclasses ("trl.DPOTrainer")
    config: ClassVar[TRLConfig | None] = None  # its TRL config class; None: it trains nothing
    layouts: ClassVar[tuple] = ()  # the column sets it accepts (after data.columns), the first preferred
    default_plugins: ClassVar[dict] = {}  # the plugins a recipe of this stage gets when it names none
    managed: ClassVar[dict] = COMMON_MANAGED  # TRL field -> where to say it instead
    renamed: ClassVar[dict] = COMMON_RENAMED  # field this TRL config lacks -> what to write instead
    hooks: ClassVar[tuple] = ()  # every hook the stage calls
    required_hooks: ClassVar[tuple] = ()  # hooks some enabled plugin must implement
    has_reference: ClassVar[bool] = False  # it may compare the policy with a reference model (model.reference)
    summary_rows: ClassVar[tuple] = ()  # (label, group, key): its own before/after rows on screen
    pipeline_keys: ClassVar[tuple] = ()  # keys of its summary.json that a pipeline's summary carries
    # a model stage's output: a causal LM (None), or a sequence classifier with one label ("reward")
    head: ClassVar[str | None] = None
    panels: ClassVar[tuple] = ()  # what `posttrain compare` draws for it (Panel), besides the greedy answers
    # whether `--resume` may train it longer (a larger training.max_steps or num_train_epochs): true of a stage
    # that trains one TRL run from its checkpoints
    resumes_longer: ClassVar[bool] = True
    # dataset columns its trainer hands reward sources as arguments of their own, never in ``columns``
    reward_arguments: ClassVar[tuple] = ()
    generates: ClassVar[bool] = False  # it trains on the policy's own samples of its prompts (data.prompt_format)

    @dataclass
    class Options:
        """The recipe keys only this stage reads (none by default)."""

    # -- declarations --------------------------------------------------------------------------

    @property
    def trains(self) -> bool:
        return self.config is not None

    @property
    def extendable(self) -> bool:
        """Whether ``--resume`` may change how long it trains (``resumes_longer``, and it trains)."""
        return self.trains and self.resumes_longer

    @property
    def columns(self) -> tuple:
        return self.layouts[0] if self.layouts else ()

    @property
    def alternative(self) -> tuple:
        return self.layouts[1] if len(self.layouts) > 1 else ()

    @classmethod
    def option_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Options)]

    def parse_options(self, raw: dict, where: str = "") -> Any:
        """The stage's options from the recipe keys that belong to it (checked as a plugin's options are:
        types, unknown keys, required keys, ``validate()``); errors name ``where.KEY`` (``KEY`` at the top
        of a one-stage recipe)."""
        from .plugin import parse_options

        return parse_options(self.Options, raw, where=where, owner=f"the {self.name} stage")

    # -- what a stage does ---------------------------------------------------------------------

    def check(self, plan: Plan) -> None:
        """Refuse what cannot work in this stage, before anything loads (UserError naming the field)."""

    def memory(self, cfg: dict, plugins: PluginSet, recipe: Recipe, *, prompt_length: int | None,
               max_positions: int | None, processes: int) -> MemoryFacts:
        """One micro-batch as ``posttrain estimate`` models it. ``cfg``: the TRL config values (TRL's
        defaults, the plugins', the recipe's); ``max_positions``: the model's longest input; ``processes``:
        the processes the run will have."""
        seq = int(cfg.get("max_length") or 1024)
        rows = int(cfg.get("per_device_train_batch_size") or 8)
        return MemoryFacts(rows=rows, seq_len=seq, scored_tokens=rows * seq)

    def run(self, plan: Plan, run_dir: Path, resume: bool) -> StageResult:
        raise NotImplementedError

    def output(self, run_dir: Path, recipe: Recipe, result: StageResult | None = None) -> Path:
        """Where the stage's model is for the stages after it: ``merged/`` with LoRA (the adapter merged
        by the runner), else ``final/``."""
        return run_dir / ("merged" if recipe.model.lora is not None else "final")

    def dataset(self, run_dir: Path) -> Path | None:
        """The dataset the stage writes for later stages (``data.source: stages.NAME``), if any."""
        return None

    def finished(self, run_dir: Path, recipe: Recipe) -> bool:
        """Whether an earlier run of the stage in ``run_dir`` is complete (its output can be reused)."""
        return (run_dir / "summary.json").is_file() and (self.output(run_dir, recipe) / "config.json").is_file()

    def __repr__(self) -> str:
        return f"<stage {self.name}>"
