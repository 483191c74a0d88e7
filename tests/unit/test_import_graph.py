"""The package's imports flow one way (docs/architecture.md): a module imports only modules of its own layer or of
lower layers, and no two modules import each other, directly or through others. Read from the source with `ast`
(imports inside functions count too: a lazy import is still a dependency)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# Lowest first. A module belongs to the longest prefix listed; imports may go to the same or a lower layer.
LAYERS: list[tuple[str, ...]] = [
    ("robustlab.errors", "robustlab.version"),
    ("robustlab.utils", "robustlab.validation", "robustlab.registry", "robustlab.outputs", "robustlab.rng"),
    ("robustlab.threat",),
    ("robustlab.types",),  # the records passed between parts (AttackOut names its threat model)
    ("robustlab.losses", "robustlab.data", "robustlab.models"),
    ("robustlab.attacks",),
    ("robustlab.label_metrics",),  # costs between classes (WPGD), one measured with targeted DeepFool
    ("robustlab.detection", "robustlab.data.standins"),  # stand-ins write classification and detection formats
    ("robustlab.methods",),
    ("robustlab.engine", "robustlab.reports.markdown"),  # the Markdown tables of results depend on nothing
    ("robustlab",),  # the package root: the public names (`robustlab.evaluate`, ...)
    ("robustlab.analysis", "robustlab.reports"),
    ("robustlab.pipelines",),
    ("robustlab.cli",),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "robustlab").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the robustlab modules it imports (`from pkg import sub` counts as importing pkg.sub)."""

    def resolve(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == "robustlab"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    stem = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(stem + ([base] if base else []))
                if base.split(".")[0] == "robustlab":
                    found |= {resolve(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else resolve(base)
                              for a in node.names}
        found.discard(mod)
        graph[mod] = found
    return graph


def layer_of(mod: str) -> int:
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and p.count(".") > depth:
                best, depth = i, p.count(".")
    assert best is not None, f"{mod} is in no layer: add it to LAYERS"
    return best


@pytest.fixture(scope="module")
def graph():
    return _imports(_modules())


def test_every_import_goes_to_the_same_or_a_lower_layer(graph):
    against = sorted(f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
                     for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))
    assert not against, "imports against the layer order:\n" + "\n".join(against)


def test_no_import_cycles(graph):
    # Tarjan's strongly connected components: any component of two or more modules is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_violations():
    """The checks above can fail: a made-up upward import and a made-up cycle are caught."""
    assert layer_of("robustlab.threat.lp") < layer_of("robustlab.attacks.pgd") < layer_of("robustlab.cli.main")
    assert layer_of("robustlab.label_metrics.metric") < layer_of("robustlab.methods.wpgd") < layer_of("robustlab.analysis.wpgd")
    mods = _modules()
    g = _imports(mods)
    assert "robustlab.threat" in g["robustlab.attacks.base"] or "robustlab.threat.lp" in g["robustlab.attacks.base"]
    with pytest.raises(AssertionError, match="layer order"):
        test_every_import_goes_to_the_same_or_a_lower_layer({**g, "robustlab.threat.lp": {"robustlab.cli.main"}})
    with pytest.raises(AssertionError, match="cycles"):
        test_no_import_cycles({**g, "robustlab.errors": {"robustlab.utils"}, "robustlab.utils": {"robustlab.errors"}})


def test_the_documented_layers_are_the_enforced_ones():
    """docs/architecture.md's diagram lists exactly LAYERS, in order."""
    text = (SRC.parent / "docs" / "architecture.md").read_text()
    block = text.split("```")[1]
    documented = [tuple(name.strip() for name in group.split(",")) for group in block.replace("\n", " ").split("->")]
    enforced = [tuple(m.removeprefix("robustlab.") if m != "robustlab" else m for m in layer) for layer in LAYERS]
    assert documented == enforced
