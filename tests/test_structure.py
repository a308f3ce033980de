"""Structure rules of the idmr_jax package, checked on the source alone (``ast``; nothing is imported).

* no import cycle among idmr_jax modules, imports inside functions included;
* idmr_jax never imports ``data_prep`` (the data preparation scripts depend on the library, not the reverse);
* no module uses another module's private name (``from x import _y`` or ``x._y``);
* no file in idmr_jax/ over 450 lines, and ``idmr_jax/convert.py`` under 150.

Import resolution: ``import a.b`` is an edge to ``a.b``; ``from a import b`` is an edge to ``a.b`` when that is a
module, else to ``a`` (a package's ``__init__`` or a module); relative imports are resolved against the file's
package. Python also runs every parent package's ``__init__`` when it imports ``a.b``; those implicit edges are
not counted: a package ``__init__`` that re-exports its submodules would otherwise form a cycle with every
submodule importing a sibling, which is how packages are meant to work. An explicit import of a package
(``from idmr_jax import tasks``, ``from idmr_jax.losses import similarity`` where that is a name, not a module)
does count.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "idmr_jax"
MAX_LINES = 450
CONVERT_MAX_LINES = 149  # idmr_jax/convert.py must stay under 150 lines


def _module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class _FileImports(ast.NodeVisitor):
    """Every import of one file (module level and inside functions), its private-name uses and data_prep imports."""

    def __init__(self, module: str, path: pathlib.Path, modules: dict[str, pathlib.Path], root: pathlib.Path = ROOT):
        self.module, self.modules = module, modules
        self.package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        self.edges: set[str] = set()
        self.private: list[str] = []
        self.data_prep: list[str] = []
        self.aliases: dict[str, str] = {}  # local name -> idmr_jax module it is bound to
        self.where = str(path.relative_to(root))

    def _target(self, name: str) -> str | None:
        """The idmr_jax module `name` refers to (itself, or the nearest enclosing module), or None."""
        while name and name not in self.modules:
            name = name.rpartition(".")[0]
        return name or None

    def _note(self, name: str, lineno: int) -> None:
        line = f"{self.where}:{lineno} imports {name}"
        if (name == "data_prep" or name.startswith("data_prep.")) and line not in self.data_prep:
            self.data_prep.append(line)
        target = self._target(name) if name.split(".")[0] == PACKAGE else None
        if target and target != self.module:
            self.edges.add(target)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._note(alias.name, node.lineno)
            if alias.asname and alias.name in self.modules:
                self.aliases[alias.asname] = alias.name
            elif not alias.asname:
                top = alias.name.split(".")[0]
                if top in self.modules:
                    self.aliases[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            full = f"{source}.{alias.name}"
            if full in self.modules:
                self._note(full, node.lineno)
                self.aliases[alias.asname or alias.name] = full
            else:
                self._note(source, node.lineno)
            if _is_private(alias.name) and source in self.modules and source != self.module:
                self.private.append(f"{self.where}:{node.lineno} imports {source}.{alias.name}")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if _is_private(node.attr):
            owner = _dotted(node.value)
            module = self.aliases.get(owner.split(".")[0]) if owner else None
            if module is not None:
                rest = owner.split(".")[1:]
                full = ".".join([module, *rest])
                if full in self.modules and full != self.module:
                    self.private.append(f"{self.where}:{node.lineno} uses {full}.{node.attr}")
        self.generic_visit(node)


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def _scan() -> tuple[dict[str, pathlib.Path], dict[str, _FileImports]]:
    modules = _modules()
    scans = {}
    for name, path in modules.items():
        scan = _FileImports(name, path, modules)
        scan.visit(ast.parse(path.read_text(), filename=str(path)))
        scans[name] = scan
    return modules, scans


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_one_cycle(graph, sorted(c)) for c in components]


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first), to show in the failure."""
    members, start = set(component), component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def test_no_import_cycles():
    modules, scans = _scan()
    graph = {name: scan.edges for name, scan in scans.items()}
    cycles = _cycles(graph)
    shown = [" -> ".join(str(modules[m].relative_to(ROOT)) for m in cycle) for cycle in cycles]
    assert not cycles, "import cycles among idmr_jax modules:\n  " + "\n  ".join(shown)


def test_no_data_prep_imports():
    _, scans = _scan()
    found = [line for scan in scans.values() for line in scan.data_prep]
    assert not found, "idmr_jax imports data_prep:\n  " + "\n  ".join(found)


def test_no_private_names_across_modules():
    _, scans = _scan()
    found = [line for scan in scans.values() for line in scan.private]
    assert not found, "private names used from another module:\n  " + "\n  ".join(found)


def test_file_sizes():
    too_long = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        n = len(path.read_text().splitlines())
        limit = CONVERT_MAX_LINES if path == ROOT / PACKAGE / "convert.py" else MAX_LINES
        if n > limit:
            too_long.append(f"{path.relative_to(ROOT)}: {n} lines (limit {limit})")
    assert not too_long, "files over the size limit:\n  " + "\n  ".join(too_long)


def test_resolver_sees_function_level_and_relative_imports(tmp_path):
    """The checks above are only as good as the resolver: a self-check on a synthetic package."""
    src = {
        "idmr_jax/__init__.py": "",
        "idmr_jax/a.py": "def f():\n    from idmr_jax import b\n    return b._hidden\n",
        "idmr_jax/b.py": "from . import c\n",
        "idmr_jax/c.py": "from .a import _g\nimport data_prep.tool\n",
    }
    for rel, text in src.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    paths = {_module_name(tmp_path / rel, tmp_path): tmp_path / rel for rel in src}
    scans = {}
    for name, path in paths.items():
        scan = _FileImports(name, path, paths, tmp_path)
        scan.visit(ast.parse(path.read_text()))
        scans[name] = scan
    graph = {n: s.edges for n, s in scans.items()}
    assert graph["idmr_jax.a"] == {"idmr_jax.b"} and graph["idmr_jax.b"] == {"idmr_jax.c"}
    assert graph["idmr_jax.c"] == {"idmr_jax.a"}
    assert _cycles(graph) == [["idmr_jax.a", "idmr_jax.b", "idmr_jax.c", "idmr_jax.a"]]
    assert scans["idmr_jax.a"].private == ["idmr_jax/a.py:3 uses idmr_jax.b._hidden"]
    assert scans["idmr_jax.c"].private == ["idmr_jax/c.py:1 imports idmr_jax.a._g"]
    assert scans["idmr_jax.c"].data_prep

