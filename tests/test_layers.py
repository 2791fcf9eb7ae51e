"""The package is a layered graph: entry points (the CLI, ``__main__`` modules) above the stages, the stages
above the shared machinery, all of it above the kernels. Read from the source (no imports run), so a
violation fails here before it turns into an import cycle at run time."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"sft", "rm", "ppo", "ppo_trainer", "pipeline", "demo"}


def _modules(package: Path, prefix: str) -> dict[str, Path]:
    out = {}
    for file in package.rglob("*.py"):
        parts = file.relative_to(package).with_suffix("").parts
        name = ".".join((prefix, *parts)).removesuffix(".__init__")
        out[name] = file
    return out


MODULES = _modules(ROOT / "fastrlhf", "fastrlhf")


def _imports(file: Path, *, module_level: bool) -> set[str]:
    """The fastrlhf modules ``file`` imports (``from fastrlhf.x import y`` counts x, and x.y if a module)."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    if module_level:  # (imports under a module-level if or try run at import time too)
        nodes = [n for top in tree.body for n in (top.body if isinstance(top, ast.If | ast.Try) else [top])]
    else:
        nodes = list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fastrlhf":
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "fastrlhf"}
    return out


def _layer(name: str) -> str:
    short = name.removeprefix("fastrlhf.")
    if short == "cli" or short.endswith("__main__"):
        return "entry"
    return "stage" if short in STAGES else "shared"


def test_module_level_imports_have_no_cycle():
    graph = {m: _imports(f, module_level=True) & set(MODULES) - {m} for m, f in MODULES.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, module, dep])
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_shared_machinery_imports_no_stage_and_no_entry_point():
    """Not even lazily inside a function: the stages use the machinery, never the reverse."""
    bad = {
        module: sorted(dep for dep in _imports(file, module_level=False) if _layer(dep) != "shared")
        for module, file in MODULES.items()
        if _layer(module) == "shared" and module != "fastrlhf"
    }
    assert {m: deps for m, deps in bad.items() if deps} == {}


def test_stages_do_not_import_the_cli():
    bad = {
        module: sorted(dep for dep in _imports(file, module_level=False) if _layer(dep) == "entry")
        for module, file in MODULES.items()
        if _layer(module) == "stage"
    }
    assert {m: deps for m, deps in bad.items() if deps} == {}


def test_kernels_import_nothing_of_the_trainer():
    """``fastrlhf.kernels`` is a library other projects import: only itself, torch and triton."""
    for name, file in _modules(ROOT / "kernels", "fastrlhf.kernels").items():
        deps = {d for d in _imports(file, module_level=False) if not d.startswith("fastrlhf.kernels")}
        assert not deps, f"{name} imports {sorted(deps)}"


def test_the_checks_see_the_package():
    """A guard for the checks above: they read real modules and real imports."""
    assert {"fastrlhf.cli", "fastrlhf.ppo", "fastrlhf.models", "fastrlhf.distributed.optim"} <= set(MODULES)
    assert "fastrlhf.models" in _imports(MODULES["fastrlhf.ppo"], module_level=True)
    assert _layer("fastrlhf.rank.__main__") == "entry" and _layer("fastrlhf.ppo_trainer") == "stage"
