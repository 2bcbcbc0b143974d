"""The package's layers: every import (at module level or inside a function) points down or within a layer, never
up, and no modules import each other in a circle. The layers, bottom up, are listed here once."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "looper"

LAYERS = [  # bottom up: a module may import its own layer's and lower layers' modules
    ("pure helpers", {"answers", "equations", "stats", "seeds", "distributed"}),
    ("schema", {"config", "conf", "prompts"}),  # the config, and the prompts it renders
    ("engine", {"engine"}),
    (
        "services",
        {"artifacts", "data", "models", "tiny", "tracking", "throughput", "training", "coherence", "credit"}
        | {"scoring", "bandit", "eval_report", "eval_dashboard", "report"},
    ),
    ("stages", {"stages"}),
    ("pipeline", {"pipeline"}),
    ("entrypoint", {"__main__", "preflight"}),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The looper modules `module` imports, anywhere in its file."""
    out = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rsplit(".", 1)[0] if "." in name else ""
            if name and name != module and name != "looper":
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {m: imports(m, p, set(found)) for m, p in found.items() if m != "looper"}


def test_no_import_points_up_a_layer():
    upward = [
        f"{m} ({LAYERS[layer(m)][0]}) imports {t} ({LAYERS[layer(t)][0]})"
        for m, targets in graph().items()
        for t in targets
        if not t.startswith(m + ".") and layer(t) > layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_modules_import_each_other_in_a_circle():
    # (a package's __init__ importing its modules counts; a module importing its own package is already under way)
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph().items()}
    state, circles = {}, []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(trail[trail.index(target) :] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(circles)


def test_the_stages_reach_the_engine_only_through_its_package_and_no_stage_imports_another():
    for module, targets in graph().items():
        if module.startswith("looper.stages."):
            assert not [t for t in targets if t.startswith("looper.engine.")], module
            assert not [t for t in targets if t.startswith("looper.stages.")], module


def test_no_module_is_longer_than_one_can_hold_in_mind():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long
