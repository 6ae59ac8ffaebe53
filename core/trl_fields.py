"""The fields of TRL's config classes, read from their source without importing them.

``posttrain validate`` must reject an unknown ``training.<key>`` without importing torch (TRL's
config modules import transformers' TrainingArguments, which imports torch). The config
classes are plain dataclasses, so their fields are the annotated assignments in the class
bodies along the inheritance chain below; a test compares this with
``dataclasses.fields()`` of the real classes, so a TRL upgrade that moves things fails loudly.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path

from .stage import TRLConfig

def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # top-level: locates without importing
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


_NO_DEFAULT = object()


def _default(value: ast.expr | None):
    """The literal default of a dataclass field (``x: int = 3`` or ``field(default=3)``), or _NO_DEFAULT."""
    if isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", "")) == "field":
        value = next((kw.value for kw in value.keywords if kw.arg == "default"), None)
    if value is None:
        return _NO_DEFAULT
    try:
        return ast.literal_eval(value)
    except ValueError:
        return _NO_DEFAULT


@lru_cache(maxsize=None)
def _read_fields(config: TRLConfig) -> tuple[dict[str, str], dict[str, object]]:
    fields: dict[str, str] = {}
    defaults: dict[str, object] = {}
    for package, relpath, class_name in reversed(config.chain):
        tree = ast.parse((_package_dir(package) / relpath).read_text(encoding="utf-8"))
        cls = next(
            (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None
        )
        if cls is None:
            raise RuntimeError(f"{class_name} not found in {package}/{relpath}; is the {package} version supported?")
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if "ClassVar" in ast.unparse(node.annotation) or node.target.id.startswith("_"):
                    continue
                fields[node.target.id] = ast.unparse(node.annotation)
                default = _default(node.value)
                if default is _NO_DEFAULT:
                    defaults.pop(node.target.id, None)
                else:
                    defaults[node.target.id] = default
    return fields, defaults


def config_fields(config: TRLConfig) -> dict[str, str]:
    """``{field name: annotation source}`` of a TRL config class (a stage's ``config``)."""
    return _read_fields(config)[0]


def config_defaults(config: TRLConfig) -> dict[str, object]:
    """``{field name: default}`` for the fields of that class whose default is a literal."""
    return _read_fields(config)[1]


_SIMPLE = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),),
           "dict": (dict,), "list": (list,)}


def value_matches(annotation: str, value) -> bool:
    """A loose check of a YAML value against an annotation written as source text.

    Plain types (int, float, bool, str, None, dict, list and their unions) are checked; any
    annotation part it does not understand (enums, Any, classes) accepts the value, and the
    TRL config itself has the last word when the run builds it.
    """
    text = annotation.replace("Optional[", "").replace("Union[", "").replace("]", "")
    parts = [p.strip() for chunk in text.split("|") for p in chunk.split(",")]
    allowed: list[type] = []
    for part in parts:
        base = part.split("[")[0].strip()
        if base not in _SIMPLE:
            return True
        allowed.extend(_SIMPLE[base])
    if isinstance(value, bool) and bool not in allowed:
        return False
    return isinstance(value, tuple(allowed))
