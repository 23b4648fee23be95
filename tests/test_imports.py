"""The package's import graph, read from the source with `ast`: no cycles, layering one way, no private names.

Every import counts, also the ones inside functions (a lazy import still ties two modules
together). The layering is data -> models -> losses -> train / evaluate -> apps -> cli.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prodclip"

# Modules that must not import these (the lower layers never reach up to the trainer or the CLI).
FORBIDDEN = {
    "prodclip.data": ("prodclip.train", "prodclip.cli", "prodclip.run"),
    "prodclip.models": ("prodclip.train", "prodclip.cli", "prodclip.run"),
    "prodclip.losses": ("prodclip.train", "prodclip.cli", "prodclip.run"),
    "prodclip.evaluate": ("prodclip.train", "prodclip.cli"),
}


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    return {module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}


def imports_of(path: pathlib.Path, modules: dict[str, pathlib.Path]):
    """(imported prodclip modules, [(line, 'module._name')] private names used from another module)."""
    tree = ast.parse(path.read_text(), str(path))
    imported: set[str] = set()
    private: list[tuple[int, str]] = []
    aliases: dict[str, str] = {}  # local name -> prodclip module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "prodclip":
                    imported.add(a.name)
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "prodclip"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "prodclip":
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in modules:  # `from prodclip.models import factory`: a module
                    imported.add(full)
                    aliases[a.asname or a.name] = full
                else:  # `from prodclip.models.factory import merge_model`: a name of a module
                    imported.add(node.module)
                    if a.name.startswith("_"):
                        private.append((node.lineno, f"{node.module}.{a.name}"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            private.append((node.lineno, f"{aliases[node.value.id]}.{node.attr}"))
    return {m for m in imported if m in modules}, private


def import_graph(package: pathlib.Path = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    """({module: modules it imports}, ['file:line uses module._name', ...])."""
    modules = package_modules(package)
    graph, problems = {}, []
    for name, path in modules.items():
        deps, private = imports_of(path, modules)
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".") and d != "prodclip"}
        problems += [f"{path.relative_to(package.parent)}:{line} uses {used}" for line, used in private
                     if not used.startswith(name + ".")]
    return graph, problems


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        for layer, forbidden in FORBIDDEN.items():
            if module == layer or module.startswith(layer + "."):
                bad += [f"{module} imports {d}" for d in sorted(deps) if d in forbidden]
    return bad


def test_no_import_cycles():
    graph, _ = import_graph()
    cycles = find_cycles(graph)
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_lower_layers_do_not_import_train_or_cli():
    graph, _ = import_graph()
    bad = layering_violations(graph)
    assert bad == [], "; ".join(bad)


def test_no_private_names_across_modules():
    _, problems = import_graph()
    for directory in ("tests", "benchmarks"):  # the package's users too
        modules = package_modules()
        for path in sorted((ROOT / directory).glob("*.py")):
            problems += [f"{path.relative_to(ROOT)}:{line} uses {used}" for line, used in imports_of(path, modules)[1]]
    assert problems == [], "; ".join(problems)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A package with a cycle through a lazy import, a model importing the trainer, and a private import."""
    pkg = tmp_path / "prodclip"
    (pkg / "models").mkdir(parents=True)
    for name, text in {
        "__init__.py": "", "models/__init__.py": "",
        "train.py": "from prodclip.models import fusion\n",
        "models/fusion.py": "def f():\n    from prodclip.train import merge_model\n",
        "search.py": "from prodclip.models import fusion\nfusion._helper()\n",
        "audit.py": "from prodclip.search import _png_bytes\n",
    }.items():
        (pkg / name).write_text(text)
    graph, problems = import_graph(pkg)
    assert find_cycles(graph) == [["prodclip.models.fusion", "prodclip.train"]]
    assert layering_violations(graph) == ["prodclip.models.fusion imports prodclip.train"]
    assert sorted(problems) == ["prodclip/audit.py:1 uses prodclip.search._png_bytes",
                                "prodclip/search.py:2 uses prodclip.models.fusion._helper"]
