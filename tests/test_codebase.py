"""The code's shape: modules and packages import one another in one direction only; the launcher's config layer
loads no torch."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages", "reward_model")


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports, at any depth of its code (function-level imports included)."""
    modules = {str(p.relative_to(ROOT).with_suffix("")).replace("/", ".").removesuffix(".__init__"): p
               for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, found by a depth-first walk (each reported from where the walk met it)."""
    found, state = [], {}

    def walk(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    return found


def test_the_cycle_finder_finds_a_circle_and_passes_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = project_imports()
    assert "pipeline.models" in graph and "pipeline.tokenizer" in graph["pipeline.models"]  # the walk sees imports
    assert cycles(graph) == []


def test_no_package_imports_one_that_imports_it_back():
    """pipeline <- reward_model <- stages: the shared core imports neither the reward model nor the stages."""
    graph = project_imports()
    packages = {p: set() for p in PACKAGES}
    for module, imported in graph.items():
        packages[module.split(".")[0]] |= {m.split(".")[0] for m in imported} - {module.split(".")[0]}
    assert packages["stages"] >= {"pipeline", "reward_model"}  # the walk sees the packages' imports
    assert cycles(packages) == [], packages


def test_the_config_layer_loads_no_torch():
    """`make all` filters each stage's overrides through pipeline.config before any stage starts: it must not pay for
    importing torch (or transformers) to do so."""
    code = "import sys, pipeline.config, pipeline.all; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
