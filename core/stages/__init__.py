"""The stages, found in this package: every module here that defines ``STAGE``, an instance of
:class:`posttrain.stage.Stage`. A new stage is one new module (its trainer, when it has one, in
``posttrain.trainers``); nothing else in the core lists the stages. Importing this package imports
every stage's declaration, which is plain data (no torch).

``ORDER`` is only the order in which they are shown (``posttrain stages``, the errors naming them), the
order of the table in docs/recipes.md; a stage it does not name comes after these, by name.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import UserError, did_you_mean
from ..stage import Stage

ORDER = ("sft", "reward_model", "preference", "online", "iterative", "rejection_sampling", "kto", "distillation")


def _discover() -> dict[str, Stage]:
    found: dict[str, Stage] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        stage = getattr(module, "STAGE", None)
        if isinstance(stage, Stage):
            if stage.name in found:
                raise RuntimeError(f"two stage modules declare the stage '{stage.name}'")
            found[stage.name] = stage
    return dict(sorted(found.items(), key=lambda kv: (ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER), kv[0])))


STAGES: dict[str, Stage] = _discover()


def get_stage(name: str, field: str = "stage") -> Stage:
    """The stage called ``name``, or a user error naming ``field`` with the stages there are."""
    stage = STAGES.get(str(name))
    if stage is None:
        raise UserError(f"unknown stage {name!r}{did_you_mean(name, STAGES)}", field=field,
                        fix=f"stages: {', '.join(STAGES)} (`posttrain stages` describes each)")
    return stage


def owner_of_key(key: str) -> list[str]:
    """The stages that read ``key`` as one of their own recipe keys (for the hint of an unknown key)."""
    return [name for name, stage in STAGES.items() if key in stage.option_keys()]
