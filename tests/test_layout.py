"""The library's layout, as the code's own imports show it (read with ``ast``, so nothing is imported):

- three layers, each importing only the ones below: ``clinseg.datasets`` < ``clinseg.transforms`` <
  ``clinseg.pipelines``;
- inside ``clinseg.pipelines``, the engine (what a bundle's engines run) never imports the orchestration around it
  (experiments, search, export, deploy, new_task, demo, benchmarks), only the shared modules;
- no import cycle between modules, counting the imports inside functions as well;
- one project root and one way to publish a file or a folder atomically.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGES = {"datasets": "clinseg.datasets", "transforms": "clinseg.transforms", "pipelines": "clinseg.pipelines"}
ORCHESTRATION = ("experiments", "search", "export", "deploy", "new_task", "demo", "benchmarks")
SHARED = ("cli", "config_checks", "context", "paths", "runs", "spool", "studies", "tracking")


def library_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The library modules ``path`` imports, anywhere in it (``from a.b import c`` counts ``a.b.c`` when that is a
    module, else ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name.count(".") >= 1:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    graph = {}
    for name, path in modules.items():
        # a package's own ``__init__`` is not a dependency of its submodules' imports of one another
        graph[name] = {m for m in imports_of(path, modules) if m != name and not name.startswith(m + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[1] != "pipelines" or len(parts) < 3:
        return parts[1]
    if parts[2] == "engine":
        return "engine"
    return "orchestration" if parts[2] in ORCHESTRATION else "shared" if parts[2] in SHARED else parts[2]


def test_every_pipelines_module_has_a_stage():
    stages = {layer_of(m) for m in library_modules() if m.startswith("clinseg.pipelines.")}
    assert stages == {"engine", "orchestration", "shared"}, f"modules outside the named stages: {stages}"


def test_each_layer_imports_only_the_layers_below():
    below = {
        "datasets": set(),
        "transforms": {"datasets"},
        "shared": {"datasets", "transforms", "shared"},
        "engine": {"datasets", "transforms", "shared", "engine"},
        "orchestration": {"datasets", "transforms", "shared", "engine", "orchestration"},
        "pipelines": {"datasets", "transforms", "shared", "engine", "orchestration"},  # the package's lazy loader
    }
    wrong = [
        f"{module} ({layer_of(module)}) imports {imported} ({layer_of(imported)})"
        for module, imported_modules in import_graph().items()
        for imported in sorted(imported_modules)
        if layer_of(imported) not in below[layer_of(module)] | {layer_of(module)}
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)
    # the check can fail: a cycle put into the graph is found
    graph = import_graph()
    graph["clinseg.datasets.io"] = graph["clinseg.datasets.io"] | {"clinseg.datasets.fingerprint"}
    assert any({"clinseg.datasets.fingerprint", "clinseg.datasets.io"} <= set(c) for c in cycles(graph))


def test_one_project_root_and_one_atomic_publish():
    own_root = re.compile(r"Path\(__file__\)\.resolve\(\)\.parents\[")
    renames = re.compile(r"\bos\.(replace|rename)\(|\.rename\(")
    roots, publishes = [], []
    for module, path in library_modules().items():
        text = path.read_text()
        if own_root.search(text) and module != "clinseg.datasets.locations":
            roots.append(module)
        if renames.search(text) and module != "clinseg.datasets.io":
            publishes.append(module)
    assert not roots, f"project roots computed outside clinseg.datasets.locations: {roots}"
    # the Deploy runtime places a run's staged files into the output folder it was given, never replacing a file (a
    # rename only where the file system has no hard links);
    # the evaluation report hands MONAI's finished metric tables to atomic_write_all as their writer
    expected = ["clinseg.pipelines.deploy.runtime", "clinseg.pipelines.engine.handlers.evaluation"]
    assert publishes == expected, f"renames outside clinseg.datasets.io: {publishes}"


SKIPS = {"skip", "skipif", "importorskip"}


def test_tests_skip_only_through_the_shared_rules():
    """A test skips only through conftest's two rules: real data absent (``shared_path``) or a prerequisite missing
    (``prerequisite_missing``, a failure as root and under CI). A ``pytest.skip`` or ``skipif`` elsewhere could skip
    as root, which is how CI runs, so the test would never run anywhere."""
    found = []
    for path in sorted((REPO_ROOT / "tests").glob("*.py")):
        if path.name == "conftest.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and node.attr in SKIPS and getattr(node.value, "id", None) == "pytest":
                found.append(f"{path.name}:{node.lineno} pytest.{node.attr}")
            elif isinstance(node, ast.Attribute) and node.attr in SKIPS and getattr(node.value, "attr", None) == "mark":
                found.append(f"{path.name}:{node.lineno} pytest.mark.{node.attr}")
    assert not found, "skips outside tests/conftest.py's shared_path and prerequisite_missing: " + ", ".join(found)


def top_level_names(path: Path) -> set[str]:
    """The names a module defines or imports at its top level (inside ``if``/``try`` blocks too)."""
    names = set()
    body = list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            body += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            body += [n for handler in getattr(node, "handlers", []) for n in handler.body]
    return names


def test_every_name_imported_from_the_library_exists():
    """``from clinseg.x import name``, at the top of a module or inside a function (a benchmark's, a command's),
    names a module or something ``clinseg.x`` defines: a name removed from a module fails here, not in a user's
    first run of a command that no other test imports."""
    modules = library_modules()
    defined = {name: top_level_names(path) for name, path in modules.items()}
    missing = []
    for path in [*modules.values(), *sorted((REPO_ROOT / "tests").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                missing += [
                    f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name != "*"
                    and alias.name not in defined[node.module]
                    and f"{node.module}.{alias.name}" not in modules
                ]
    assert not missing, missing


def test_a_state_home_elsewhere_still_finds_the_bundles(tmp_path):
    """``CLINSEG_HOME`` moves the state (phantoms, caches, the MLflow store), not the bundles and sources: with it set,
    ``promote``, ``register`` and the Deploy build used to find no bundle at all ("the bundles are []")."""
    probe = (
        "from clinseg.pipelines.paths import BUNDLES_DIR, bundle_names, default_store, phantom_dir; "
        "print(bundle_names(), BUNDLES_DIR, default_store(), phantom_dir('vessels'), sep='|')"
    )
    env = {**os.environ, "CLINSEG_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    names, bundles, store, phantoms = result.stdout.strip().split("|")
    assert names == "['ct_heart', 'oct_layers', 'vessels']" and Path(bundles) == REPO_ROOT / "bundles", result
    assert Path(store) == tmp_path / "mlruns" and Path(phantoms) == tmp_path / "data" / "phantoms" / "vessels"
    refused = subprocess.run(
        [sys.executable, "-m", "clinseg.pipelines.experiments", "promote", "oct_layers", "no-such-run"],
        env=env, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 1 and "is not a run in" in refused.stderr, refused.stderr
