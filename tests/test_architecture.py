"""The import graph follows the layers ARCHITECTURE.md declares, and has no cycles."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qwenkit"


def declared_layers() -> dict[str, int]:
    """Top-level part of qwenkit (package or module) -> its layer, 0 the lowest."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "ARCHITECTURE.md has no ```layers block"
    lines = [line.split() for line in block.group(1).strip().splitlines()]
    return {name: len(lines) - 1 - i for i, names in enumerate(lines) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, typing_only: bool = True) -> set[str]:
    """Every qwenkit module this file imports, wherever the import statement is; with
    typing_only=False, not those under `if TYPE_CHECKING:` (never run, so they cannot make a cycle)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = set()
    if not typing_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("qwenkit.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("qwenkit"):
            found.add(node.module)
    return found


def part(module: str) -> str:
    """The top-level part of qwenkit a module belongs to ("qwenkit.engine.llm" -> "engine")."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "qwenkit"


def graph(typing_only: bool = True) -> dict[str, set[str]]:
    return {module_name(p): imports(p, typing_only) for p in PACKAGE.rglob("*.py")}


def test_every_part_of_the_package_has_a_layer():
    layers = declared_layers()
    parts = {part(m) for m in graph()} - {"qwenkit"}
    assert parts <= layers.keys(), f"not in ARCHITECTURE.md's layers: {sorted(parts - layers.keys())}"


def layer_violations(modules: dict[str, set[str]]) -> list[str]:
    layers = declared_layers()
    layers["qwenkit"] = 0.5  # the package's own __init__ (version, QwenkitError): just above errors
    found = []
    for module, targets in modules.items():
        here = part(module)
        for target in targets:
            there = part(target)
            if there != here and layers[there] >= layers[here]:
                found.append(f"{module} imports {target} ({here} is not above {there})")
    return sorted(found)


def test_imports_only_go_down():
    violations = layer_violations(graph())
    assert not violations, "\n".join(violations)


def import_cycles(modules: dict[str, set[str]]) -> list[str]:
    edges = {m: {t for t in targets if t in modules and t != m} for m, targets in modules.items()}
    visiting, done, cycles = set(), set(), []

    def visit(m, path):
        if m in done:
            return
        if m in visiting:
            cycles.append(" -> ".join(path[path.index(m):] + [m]))
            return
        visiting.add(m)
        for t in sorted(edges[m]):
            visit(t, path + [m])
        visiting.discard(m)
        done.add(m)

    for m in sorted(edges):
        visit(m, [])
    return cycles


def test_no_import_cycles():
    cycles = import_cycles(graph(typing_only=False))
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_a_violation():
    """A low layer importing a high one, or a cycle, is reported (the checks can fail)."""
    probe = {"qwenkit.formats.probe": {"qwenkit.engine.llm"}, "qwenkit.engine.llm": set()}
    assert layer_violations(probe) == ["qwenkit.formats.probe imports qwenkit.engine.llm (formats is not above engine)"]
    assert import_cycles({"qwenkit.a.x": {"qwenkit.a.y"}, "qwenkit.a.y": {"qwenkit.a.x"}}) == ["qwenkit.a.x -> qwenkit.a.y -> qwenkit.a.x"]
