"""``stages.NAME``: an earlier pipeline stage's output, wherever a model path or a data source goes.

A recipe keeps the references as written; they are checked when the recipe is validated (they must
name an earlier stage of the same pipeline) and resolved when they are used, from what the runner
publishes as each stage finishes: its model (``merged/`` with LoRA, else ``final/``; a sampling stage's
model is the one it sampled from) and, for a stage that writes one, its dataset.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

STAGE_REF = "stages."

_models: dict[str, Path] = {}
_datasets: dict[str, Path] = {}


def is_ref(value) -> bool:
    return isinstance(value, str) and value.startswith(STAGE_REF)


def name_of(ref: str) -> str:
    return ref[len(STAGE_REF):]


def publish(name: str, model: Path | None = None, dataset: Path | None = None) -> None:
    """A finished stage's outputs, for the references of the stages after it."""
    if model is not None:
        _models[name] = Path(model)
    if dataset is not None:
        _datasets[name] = Path(dataset)


def clear() -> None:
    _models.clear()
    _datasets.clear()


def model_path(ref: str) -> str:
    """The model folder ``stages.NAME`` stands for."""
    name = name_of(ref)
    if name not in _models:
        raise UserError(f"'{ref}' has no output yet: stage '{name}' has not run in this pipeline", field=ref,
                        fix="refer to an earlier stage of the same pipeline")
    return str(_models[name].resolve())


def dataset_path(ref: str) -> str:
    """The dataset file ``stages.NAME`` stands for, as a data source."""
    name = name_of(ref)
    if name not in _datasets:
        raise UserError(f"'{ref}' as a data source: stage '{name}' wrote no dataset in this pipeline", field=ref,
                        fix="use the output of a stage that writes a dataset (rejection_sampling)")
    return str(_datasets[name].resolve())


def references(value, path: str):
    """Every ``stages.NAME`` string in recipe data, as (dotted path, NAME)."""
    if is_ref(value):
        yield path, name_of(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from references(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from references(item, f"{path}[{i}]")


# Where a data source is in recipe data (a list of sources' entries are under data.source.source here: ``resolved``
# walks a list without its indices).
DATA_SOURCES = ("data.source", "data.eval.source", "data.source.source")


def resolved(data: dict) -> dict:
    """Recipe data with every ``stages.NAME`` replaced by what it stands for now: a data source by the
    dataset that stage wrote, anything else by its model folder (what a stage's own recipe.yaml records,
    so that its run directory says which model it started from)."""
    def walk(value, path):
        if is_ref(value):
            return dataset_path(value) if path in DATA_SOURCES else model_path(value)
        if isinstance(value, dict):
            return {k: walk(v, f"{path}.{k}" if path else k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, path) for v in value]
        return value

    return walk(data, "")
