"""The package layout is the architecture: imports point one way and never form a cycle.

Layers, lowest first (docs/architecture.md draws them). A module may import from its own layer
or below, never above; within a layer, modules must not import each other in a circle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "raftlm"

LAYERS: list[tuple[str, list[str]]] = [
    ("reference math and config", ["raftlm.errors", "raftlm.core", "raftlm.config"]),
    ("foundations", ["raftlm.models", "raftlm.data", "raftlm.run"]),
    ("components", ["raftlm.sampling", "raftlm.rewards", "raftlm.training", "raftlm.agents"]),
    ("evaluation", ["raftlm.evaluation"]),
    ("stage types", ["raftlm.stage", "raftlm.stage.rollouts"]),
    ("stage steps", ["raftlm.stage.collect", "raftlm.stage.rank", "raftlm.stage.finetune",
                     "raftlm.stage.record"]),
    ("collectors", ["raftlm.stage.collectors", "raftlm.stage.hints", "raftlm.stage.replay"]),
    ("wiring", ["raftlm.stage.build"]),
    ("the algorithm", ["raftlm.stage.loop"]),
    ("entry points", ["raftlm.cli", "raftlm.__main__", "raftlm.tools", "raftlm.jobs", "raftlm"]),
]
# Everything else lives in a package; these stand at the root.
ROOT_MODULES = {"cli.py", "errors.py", "__init__.py", "__main__.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best = None
    for level, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (level, len(prefix))
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS (and the docs)")
    return best[0]


def raftlm_imports(path: Path) -> set[str]:
    """Every raftlm module `path` imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "raftlm" or node.module.startswith("raftlm."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("raftlm")}
    return found


GRAPH = {module_name(p): raftlm_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_module_imports_only_its_own_layer_or_below(module):
    upward = [m for m in GRAPH[module] if m != module and layer_of(m) > layer_of(module)]
    assert not upward, f"{module} (layer {layer_of(module)}) imports upward: {upward}"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(GRAPH.get(module, ())):
            dep = dep if dep in GRAPH else dep.rpartition(".")[0]  # `from pkg import name`
            if dep == module or dep not in GRAPH:
                continue
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [module, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_layer_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from raftlm.stage.loop import train\n")
    assert raftlm_imports(bad) == {"raftlm.stage.loop"}
    assert layer_of("raftlm.stage.loop") > layer_of("raftlm.sampling.fast")
    assert layer_of("raftlm.stage.collect") > layer_of("raftlm.stage.rollouts")


def test_no_source_file_over_400_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these modules: {long}"


def test_every_module_is_in_the_folder_table_of_the_architecture_doc():
    doc = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## Where each piece lives"):]
    missing = [module_name(p) for p in sorted(PACKAGE.rglob("*.py"))
               if p.name != "__init__.py" and f"`{p.name}`" not in table
               and f"`{p.parent.name}/{p.name}`" not in table]
    assert not missing, f"docs/architecture.md's folder table does not name: {missing}"


def test_only_the_entry_modules_stand_at_the_package_root():
    assert {p.name for p in PACKAGE.glob("*.py")} == ROOT_MODULES


def registry_rows() -> list[tuple[str, str, str]]:
    """(kind, `module.TABLE`, config field) of docs/architecture.md's registry table."""
    doc = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## Registries"):doc.index("### Adding one")]
    rows = [line.strip("|").split("|") for line in table.splitlines()
            if line.startswith("| ") and "`" in line]
    return [(kind.strip(), path.strip().strip("`"), re.findall(r"`([^`]+)`", field)[0])
            for kind, path, field in rows]


def test_the_registry_table_of_the_docs_names_every_registry_and_its_config_choices():
    import importlib
    import inspect

    from raftlm.config import RaftConfig, field_choices
    from raftlm.config.sections import RewardTerm

    rows = registry_rows()
    assert len(rows) >= 10
    documented = set()
    for kind, path, field in rows:
        module, _, name = path.rpartition(".")
        table = getattr(importlib.import_module(f"raftlm.{module}"), name)
        documented.add(path)
        assert isinstance(table, dict) and table, f"{kind}: {path} is not a registry"
        if field.startswith("reward.terms[].name /"):
            assert set(table) == set(RewardTerm.kinds), kind
        elif field.startswith(("reward.terms[].name", "rollout.tools", "rollout.tool_choice")):
            # built-ins among any function's (a tool's) name
            pass
        else:
            assert set(table) == set(field_choices(RaftConfig, field)), f"{kind}: {path}"
        # A frozen record with its flags; a preset is a pair of names; built-in tasks and
        # rewards are plain functions (the TRL reward convention).
        for record in table.values():
            assert (isinstance(record, tuple) or inspect.isfunction(record)
                    or type(record).__dataclass_params__.frozen), f"{kind}: {path}[{record}]"
    registries = {f"{p.parent.name}.{p.stem}.{name}" for p in PACKAGE.rglob("*.py")
                  for name in re.findall(r"^([A-Z][A-Z_]*): dict\[str, ", p.read_text(), re.M)}
    assert registries <= documented, f"registries missing from the docs: {registries - documented}"
