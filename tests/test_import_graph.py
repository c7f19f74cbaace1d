"""Imports in the package go one way: the commands -> the tools (extract, train, evaluate) -> the shared pieces
(metrics, labellers, IO, the toy world) -> the pipeline files. Read from the source with `ast`: every import
statement, at the top of a module or inside a function, relative or absolute."""

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "h_classifiers"
PIPELINES = ("pipeline_balancing_act", "pipeline_balancing_act_unconditional", "pipeline_balancing_act_xl")


def package_modules(root: Path, package: str, top_level: tuple[str, ...] = ()) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, whether it is a package's `__init__`), for every module of `package` and the named
    top-level modules."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    for name in top_level:
        if (root / f"{name}.py").is_file():
            modules[name] = (root / f"{name}.py", False)
    return modules


def imported_names(path: Path, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement anywhere in the file names (`from a import b` gives `a` and `a.b`, as b
    may be a module), relative imports resolved against `module`."""
    names = set()
    here = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = ".".join(part for part in (base, node.module) if part)
            else:
                target = node.module
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path, package: str, top_level: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """Module -> the modules of `package` (and `top_level`) it imports: an imported name counts as the longest module
    it starts with (`a.b.f` -> `a.b`)."""
    modules = package_modules(root, package, top_level)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, (path, is_package) in modules.items():
        targets = {resolve(name) for name in imported_names(path, module, is_package)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path `[a, b, ..., a]`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_imports_form_no_cycle():
    graph = import_graph(ROOT, PACKAGE, PIPELINES)
    assert len(graph) > 20 and "h_classifiers.commands._common" in graph
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_imports_go_from_the_commands_down_to_the_pipeline_files():
    graph = import_graph(ROOT, PACKAGE, PIPELINES)
    commands = {m for m in graph if m.startswith("h_classifiers.commands")}
    # Only the command line reaches into the commands; the tools and shared pieces never do.
    upward = {m: sorted(t & commands) for m, t in graph.items() if m not in commands and m != "h_classifiers.cli"}
    assert {m: t for m, t in upward.items() if t} == {}
    # The pipeline files stand alone (a community pipeline is one file): they import nothing of the package.
    assert {p: sorted(m for m in graph[p] if m.startswith(PACKAGE)) for p in PIPELINES} == {p: [] for p in PIPELINES}
    # The tools import no command and no other tool: extract, train and evaluate each stand on the shared pieces.
    tools = {"h_classifiers.extraction", "h_classifiers.training", "h_classifiers.evaluation"}
    assert {t: sorted(graph[t] & (tools | commands)) for t in tools} == {t: [] for t in tools}


def test_the_package_imports_nothing_of_the_lab():
    modules = package_modules(ROOT, PACKAGE, PIPELINES)
    found = {
        module: sorted(n for n in imported_names(path, module, is_package) if n.split(".")[0] in ("lab", "benchmarks"))
        for module, (path, is_package) in modules.items()
    }
    assert {m: names for m, names in found.items() if names} == {}


def test_the_graph_reads_every_kind_of_import(tmp_path):
    """The reader itself, on a package made here: imports inside functions, relative ones at any depth, `from . import
    module`, `import a.b as c` and names imported from a module all count, and a cycle through them is found."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text("def f():\n    from ..top import g\n")
    (package / "top.py").write_text("import pkg.mid as m\n\ndef g():\n    pass\n")
    (package / "mid.py").write_text("import json\n\n\ndef h():\n    from pkg.sub.leaf import f\n")
    (tmp_path / "single.py").write_text("import os\n")
    graph = import_graph(tmp_path, "pkg", ("single",))
    assert graph == {
        "pkg": set(),
        "pkg.mid": {"pkg.sub.leaf"},
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.top"},
        "pkg.top": {"pkg.mid"},
        "single": set(),
    }
    assert find_cycle(graph) == ["pkg.mid", "pkg.sub.leaf", "pkg.top", "pkg.mid"]
    (package / "mid.py").write_text("import json\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None
