"""The package's shape, checked: the import graph has no cycle (imports inside functions
and the workloads' controller paths counted), imports sit at the top of their files, no
module of the package is over 450 lines, the shared layer never asks which workload it
serves, and the Serve applications `k8s/rayservice.yaml` runs are the ones in `serve/`."""

from __future__ import annotations

import ast
import importlib
import io
import tokenize
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "rlhf_ray"
WORKLOAD_PACKAGES = ("control", "llm")
REGISTRY = "rlhf_ray.workloads"  # the one place that names the workloads
MAX_LINES = 450
# modules that import the project's own modules inside functions, and why
LAZY_IMPORTS = {
    # each command imports what it runs: `rlhf-ray presets` takes 0.3 s, where importing
    # every command's modules (torch, Ray Serve, RLlib, transformers) takes 3-4 s
    "rlhf_ray.cli",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an import names (`a.b.Symbol` -> `a.b`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(project module, inside a function, line) of every import in a file, and of every
    "module:attribute" string naming a project module (a declared controller path)."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            elif isinstance(child, ast.Constant) and isinstance(child.value, str) \
                    and child.value.startswith("rlhf_ray.") and ":" in child.value:
                names = [child.value.partition(":")[0]]
            for n in names:
                if n.startswith("rlhf_ray") and _resolve(n):
                    out.append((_resolve(n), in_function, child.lineno))
            visit(child, in_function or isinstance(child, (ast.FunctionDef,
                                                           ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


def test_the_import_graph_has_no_cycle():
    graph = {m: {dep for dep, _, _ in _imports(p) if dep != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [m, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep, path + [dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])


def test_the_projects_imports_sit_at_the_top_of_their_files():
    lazy = [f"{m}:{line}" for m, p in MODULES.items() if m not in LAZY_IMPORTS
            for dep, inside, line in _imports(p) if inside and not dep.startswith(m)]
    assert not lazy, f"imports of the project's modules inside functions: {lazy}"


def test_no_module_is_over_450_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def _shared_modules() -> dict[str, Path]:
    return {m: p for m, p in MODULES.items() if m != REGISTRY
            and not any(m == f"rlhf_ray.{w}" or m.startswith(f"rlhf_ray.{w}.")
                        for w in WORKLOAD_PACKAGES)}


def test_the_shared_layer_never_asks_which_workload_it_serves():
    """Outside the two workload packages (and the registry that names them), no code names a
    workload, a workload's config type or its controller, or compares `workload`: the
    shared layer uses what the workload declared (`runtime/workload.py`)."""
    names = set(WORKLOAD_PACKAGES)
    types = {"ControlConfig", "LLMConfig", "ControlController", "LLMController"}
    found = []
    for m, p in _shared_modules().items():
        toks = list(tokenize.generate_tokens(io.StringIO(p.read_text()).readline))
        for i, tok in enumerate(toks):
            if tok.type == tokenize.STRING and tok.string.strip("\"'") in names:
                found.append(f"{m}:{tok.start[0]} {tok.string}")
            elif tok.type == tokenize.NAME and tok.string in types:
                found.append(f"{m}:{tok.start[0]} {tok.string}")
            elif tok.type == tokenize.NAME and tok.string == "workload" and i + 1 < len(toks) \
                    and toks[i + 1].string in ("==", "!="):
                found.append(f"{m}:{tok.start[0]} workload {toks[i + 1].string}")
        for dep, _, line in _imports(p):
            if any(dep.startswith(f"rlhf_ray.{w}.") for w in WORKLOAD_PACKAGES) \
                    and m not in LAZY_IMPORTS:
                found.append(f"{m}:{line} imports {dep}")
    assert not found, found


def test_every_workload_declares_what_the_shared_layer_looks_up():
    from rlhf_ray import workloads
    from rlhf_ray.config import load_config, preset_names
    from rlhf_ray.runtime.controller import RunController

    seen = set()
    for name in preset_names():
        cfg = load_config(name)
        w = workloads.of(cfg)
        seen.add(w.name)
        assert w.config is type(cfg) and w.describe(cfg)
        assert issubclass(w.controller(), RunController)
        assert w.controller().metrics_table is w.metrics
        assert w.placement(cfg).actors and w.query_kind(cfg) is not None
        assert w.default_metric in w.metrics.sections
    assert seen == set(workloads.WORKLOADS)


def _serve_apps(doc: dict) -> dict[str, dict]:
    return {a["name"]: a for a in doc["applications"]}


def test_the_rayservice_runs_the_serve_configs_applications():
    """Every application of `k8s/rayservice.yaml` is one of `serve/*.yaml`'s and back: the
    same route, the same builder (which imports), the same arguments (their values are the
    cluster's: storage URIs, sizes)."""
    service = yaml.safe_load((ROOT / "k8s" / "rayservice.yaml").read_text())
    in_k8s = _serve_apps(yaml.safe_load(service["spec"]["serveConfigV2"]))
    in_serve = {}
    for path in sorted((ROOT / "serve").glob("*.yaml")):
        in_serve.update(_serve_apps(yaml.safe_load(path.read_text())))
    assert set(in_k8s) == set(in_serve)
    for name, app in in_k8s.items():
        local = in_serve[name]
        assert app["route_prefix"] == local["route_prefix"], name
        assert app["import_path"] == local["import_path"], name
        assert set(app.get("args", {})) == set(local.get("args", {})), name
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), app["import_path"]


# the layers, bottom up: a module imports only from its own layer or those below it
LAYERS = [("rlhf_ray.core", "rlhf_ray.errors"), ("rlhf_ray.storage",), ("rlhf_ray.runtime",),
          ("rlhf_ray.feedback",), tuple(f"rlhf_ray.{w}" for w in WORKLOAD_PACKAGES)]


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return len(LAYERS)  # the front door: cli, config, train, workloads, label, report, sweep


def test_imports_point_down_the_layers():
    """core < storage < runtime < feedback < the workloads < the front door
    (docs/architecture.md's picture)."""
    up = [f"{m} -> {dep}" for m, p in MODULES.items() for dep, _, _ in _imports(p)
          if _layer(dep) > _layer(m)]
    assert not up, up
