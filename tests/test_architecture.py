"""The core's shape, read from its source: imports flow one way (contract -> recipe and validation ->
trainers -> stages -> runner -> CLI), with no cycle and no exception; the core never imports a plugin;
the paths that must stay fast import no torch; every stage is one declaration that the docs follow."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

CORE = REPO / "core"

# Every module of the core, by layer. A module may import modules of its own layer or of a lower one.
LAYERS = [
    # 0: the contract a plugin or stage author reads
    {"errors", "hookspecs", "types", "plugin", "stage"},
    # 1: recipes, validation and what they stand on (data, models, plugins' registry, reward and sampling helpers)
    {"process", "stage_refs", "recipe", "trl_fields", "registry", "plugin_set", "builtin", "builtin.arithmetic",
     "builtin.instructions", "builtin.reasoning_gym", "builtin.safety", "data", "models", "classifier", "reference",
     "rewards", "reward_function", "sampling", "worker", "verifier", "validate", "lengths", "pairs", "seams",
     "checkpoints", "benchmarks"},
    # 2: the trainers (torch, TRL), imported only when a stage runs
    {"trainers"} | {f"trainers.{p.stem}" for p in (CORE / "trainers").glob("*.py") if p.stem != "__init__"},
    # 3: the stages: one declaration per stage, each with its run
    {"stages"} | {f"stages.{p.stem}" for p in (CORE / "stages").glob("*.py") if p.stem != "__init__"},
    # 4: the runner and what reads whole recipes or run directories
    {"pipeline", "run_dirs", "runner", "estimate", "compare"},
    # 5: the command line, the package's public face, and the kit for plugin authors
    {"cli", "__init__", "__main__", "testing"},
]
# the estimate package's modules share its layer
LAYERS[4] |= {f"estimate.{p.stem}" for p in (CORE / "estimate").glob("*.py") if p.stem != "__init__"}
# the data package's modules share its layer
LAYERS[1] |= {f"data.{p.stem}" for p in (CORE / "data").glob("*.py") if p.stem != "__init__"}
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    rel = path.relative_to(CORE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported core module) for every import of the core in a module, lazy ones included; imports
    under `if TYPE_CHECKING:` are for editors and are left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = _module_name(path)
    package = module.rsplit(".", 1)[0] if "." in module and path.name != "__init__.py" else (
        module if path.name == "__init__.py" and module != "__init__" else "")
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for child in node.body for n in ast.walk(child)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif (node.module or "").startswith("posttrain"):
                target = node.module.removeprefix("posttrain").lstrip(".")
            else:
                continue
            names = [a.name for a in node.names]
            for name in names:  # `from . import trl_fields` imports a module
                candidate = f"{target}.{name}" if target else name
                if candidate in LAYER:
                    out.append((node.lineno, candidate))
                    break
            else:
                out.append((node.lineno, target or "__init__"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("posttrain"):
                    out.append((node.lineno, alias.name.removeprefix("posttrain").lstrip(".") or "__init__"))
    return out


def _core_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in CORE.rglob("*.py")}


def test_every_core_module_has_a_layer():
    assert set(_core_modules()) == set(LAYER), "place each new module in LAYERS (tests/test_architecture.py)"


def test_imports_flow_one_way_and_never_into_a_plugin():
    upward, plugins = [], []
    for module, path in _core_modules().items():
        for line, target in _imports(path):
            if target.startswith("plugins"):
                plugins.append(f"{module}:{line} imports posttrain.{target}")
                continue
            if target not in LAYER:
                continue
            if LAYER[target] > LAYER[module]:
                upward.append(f"{module} (layer {LAYER[module]}):{line} imports {target} (layer {LAYER[target]})")
    assert not plugins, "the core must not import plugins:\n" + "\n".join(plugins)
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = {m: {t for _, t in _imports(p) if t in LAYER and t != m} for m, p in _core_modules().items()}
    seen, on_path, cycles = set(), [], []

    def visit(node):
        if node in on_path:
            cycles.append(on_path[on_path.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        on_path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        on_path.pop()

    for module in sorted(graph):
        visit(module)
    # a package imports its own modules (stages/__init__ finds the stage modules): not a cycle of code
    cycles = [c for c in cycles if not all(m.split(".")[0] == c[0].split(".")[0] for m in c)]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["recipes"], ["stages"], ["validate", "quickstart"],
                                  ["estimate", "quickstart", "--gpu-memory", "24GB"]])
def test_the_fast_paths_import_no_torch(args):
    code = ("import sys; from posttrain.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules)\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "HEAVY []" in out, out[-2000:]


def test_a_stage_is_one_declaration():
    from posttrain.stage import Stage
    from posttrain.stages import STAGES

    assert {"sft", "reward_model", "preference", "online", "iterative", "rejection_sampling"} <= set(STAGES)
    for name, stage in STAGES.items():
        assert isinstance(stage, Stage) and stage.name == name
        assert stage.about and stage.layouts and stage.hooks, name
        assert set(stage.required_hooks) <= set(stage.hooks), name
        assert type(stage).run is not Stage.run, f"{name} has no run"
