"""Import layering of the rpd_mpi package, checked by parsing every module with `ast`.

No module of rpd_mpi is imported here: the sources are read as text and parsed, so the test
runs without MPI, HDF5 or a GPU, and a module that would fail to import still gets checked.

What it enforces (each rule reports `path:line: [rule] message`):

  cycle        no import cycles among rpd_mpi modules, counting module-level imports only
               (not imports inside functions, not `if TYPE_CHECKING:` blocks). An import of
               rpd_mpi.pkg.mod is an edge to rpd_mpi.pkg.mod only, never to the parent
               package's __init__, so re-exporting __init__ files make no false cycles.
  function     an rpd_mpi import inside a function or method is an error, except exactly
               `ALLOWED_FUNCTION_IMPORTS`: rpd_mpi.entry.main -> rpd_mpi.cli (after the BLAS
               thread variables are set) and rpd_mpi.commands.cmd_train -> rpd_mpi.mpi.train
               (importing mpi4py initialises MPI). Third-party imports inside functions
               (cupy, matplotlib, numba) are fine.
  core         rpd_mpi.schedule, rpd_mpi.engines and rpd_mpi.objectives never import
               rpd_mpi.mpi, rpd_mpi.ledger, rpd_mpi.analysis, rpd_mpi.experiments,
               rpd_mpi.cli, rpd_mpi.commands, rpd_mpi.build, rpd_mpi.flags or rpd_mpi.entry.
  schedule     rpd_mpi.schedule imports only rpd_mpi.schedule, rpd_mpi.records and
               rpd_mpi.config.
  mpi4py       only rpd_mpi/mpi/comm.py, rpd_mpi/mpi/comm_links.py and rpd_mpi/mpi/comm_gpu.py
               import mpi4py.
  h5py         only modules in rpd_mpi/ledger/ import h5py.
  tools        rpd_mpi.analysis and rpd_mpi.experiments never import rpd_mpi.cli,
               rpd_mpi.commands, rpd_mpi.entry or anything in rpd_mpi.mpi (they read ledgers
               through rpd_mpi.ledger).
  front        only rpd_mpi.cli, rpd_mpi.commands and rpd_mpi.entry import rpd_mpi.cli or
               rpd_mpi.commands.
  cupy         cupy is never imported at module level (an `if TYPE_CHECKING:` block counts
               as module level).
  lazy         the reasons for the two allowed function imports hold: what rpd_mpi,
               rpd_mpi.entry, rpd_mpi.cli and rpd_mpi.commands load at import time (their
               module-level import closure, parent __init__ files included, as Python runs
               them) never reaches mpi4py, and rpd_mpi.entry's never reaches numpy.

The layer rules (core .. cupy) count every import: module level, TYPE_CHECKING blocks and
inside functions (mpi4py and h5py "module level or inside functions").

The checker is a set of plain functions over a `Tree`, a dict {module name: source text}, so
the tests below also feed it the real tree with one line injected in memory and prove that
each rule fires, with the right file and line.
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pytest

PACKAGE = "rpd_mpi"
ROOT = Path(__file__).resolve().parents[1]          # the checkout: rpd_mpi/ and tests/

Tree = dict[str, str]                               # module name -> source text

# (importing module, enclosing function, imported module): the only rpd_mpi imports that may
# sit inside a function.
ALLOWED_FUNCTION_IMPORTS: frozenset[tuple[str, str, str]] = frozenset({
    ("rpd_mpi.entry", "main", "rpd_mpi.cli"),
    ("rpd_mpi.commands", "cmd_train", "rpd_mpi.mpi.train"),
})


# ----------------------------------------------------------------------------- the tree

def load_tree(package_dir: Path = ROOT / PACKAGE) -> Tree:
    """Every module of the package as {dotted name: source}; a package is its __init__.py."""
    tree: Tree = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        parts = list(rel.parts)
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        tree[".".join(parts)] = path.read_text(encoding="utf-8")
    return tree


def is_package(name: str, tree: Tree) -> bool:
    """A module is a package (an __init__.py) when the tree holds modules below it."""
    return name == PACKAGE or any(other.startswith(name + ".") for other in tree)


def module_path(name: str, tree: Tree) -> str:
    """The file of a module, relative to the checkout, for messages."""
    base = name.replace(".", "/")
    return f"{base}/__init__.py" if is_package(name, tree) else f"{base}.py"


def in_package(name: str, package: str) -> bool:
    """`name` is `package` itself or a module below it."""
    return name == package or name.startswith(package + ".")


# ----------------------------------------------------------------------------- imports

@dataclass(frozen=True)
class Import:
    """One imported module as seen in one module's source."""

    module: str                 # the importing module
    target: str                 # the imported module (rpd_mpi ones resolved to a tree module)
    line: int
    function: str | None        # the enclosing function (Class.method), None at module level
    type_checking: bool         # inside a module-level `if TYPE_CHECKING:` block

    @property
    def module_level(self) -> bool:
        return self.function is None

    @property
    def internal(self) -> bool:
        return in_package(self.target, PACKAGE)

    @property
    def top(self) -> str:
        """The top-level name of the target: 'mpi4py' for mpi4py.MPI."""
        return self.target.split(".")[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _known(name: str, tree: Tree) -> str:
    """An rpd_mpi name resolved to the longest prefix that is a module of the tree."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in tree:
            return candidate
    return name


def _from_base(module: str, node: ast.ImportFrom, tree: Tree) -> str:
    """The module a `from X import ...` reads from, relative imports resolved."""
    if node.level == 0:
        return node.module or ""
    package = module if is_package(module, tree) else module.rpartition(".")[0]
    parts = package.split(".")
    parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
    return ".".join([*parts, node.module] if node.module else parts)


def _targets(module: str, node: ast.Import | ast.ImportFrom, tree: Tree) -> list[str]:
    """The modules one import statement names.

    `import a.b.c` is a.b.c; `from rpd_mpi.x import name` is rpd_mpi.x.name when that is a
    module of the tree, else rpd_mpi.x; `from thirdparty import name` is thirdparty.
    """
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return [_known(n, tree) if in_package(n, PACKAGE) else n for n in names]
    base = _from_base(module, node, tree)
    if not in_package(base, PACKAGE):
        return [base]
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if alias.name != "*" and sub in tree else _known(base, tree))
    return list(dict.fromkeys(out))


def imports_of(module: str, source: str, tree: Tree) -> list[Import]:
    """Every import of one module, with its line and where it sits."""
    return list(_imports_of(module, source, frozenset(tree)))


@functools.lru_cache(maxsize=4096)
def _imports_of(module: str, source: str, names: frozenset[str]) -> tuple[Import, ...]:
    tree: Tree = dict.fromkeys(names, "")          # only the names matter for resolution
    syntax = ast.parse(source, filename=module_path(module, tree))
    found: list[Import] = []

    def visit(node: ast.AST, function: str | None, scope: str, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, child, tree):
                    found.append(Import(module, target, child.lineno, function, type_checking))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{scope}{child.name}"
                visit(child, function or name, f"{name}.", type_checking)
            elif isinstance(child, ast.ClassDef):
                visit(child, function, f"{scope}{child.name}.", type_checking)
            elif isinstance(child, ast.If) and function is None and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), None, scope, True)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), None, scope, type_checking)
            else:
                visit(child, function, scope, type_checking)

    visit(syntax, None, "", False)
    return tuple(found)


def all_imports(tree: Tree) -> list[Import]:
    return [imp for name in sorted(tree) for imp in imports_of(name, tree[name], tree)]


# ----------------------------------------------------------------------------- violations

@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.message}"


def _violation(imp: Import, tree: Tree, rule: str, message: str) -> Violation:
    where = f" (in function {imp.function})" if imp.function else ""
    return Violation(module_path(imp.module, tree), imp.line, rule,
                     f"{imp.module} imports {imp.target}{where}: {message}")


# ----------------------------------------------------------------------------- cycles

def import_graph(tree: Tree) -> dict[str, dict[str, int]]:
    """Module-level, non-TYPE_CHECKING edges between tree modules: {a: {b: line of a's import}}."""
    graph: dict[str, dict[str, int]] = {name: {} for name in tree}
    for imp in all_imports(tree):
        if imp.module_level and not imp.type_checking and imp.target in tree:
            graph[imp.module].setdefault(imp.target, imp.line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def shortest_cycle_through(graph: dict[str, dict[str, int]], start: str) -> list[str] | None:
    """The shortest path start -> ... -> start (breadth first), or None."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    return None


@dataclass(frozen=True)
class Cycle:
    members: tuple[str, ...]        # every module of the strongly connected component
    path: tuple[str, ...]           # one concrete cycle, first module repeated at the end
    lines: tuple[str, ...]          # `path:line` of each edge of `path`

    def __str__(self) -> str:
        steps = "\n".join(f"    {a} -> {b}  ({where})" for a, b, where in
                          zip(self.path, self.path[1:], self.lines))
        return (f"import cycle among {len(self.members)} modules: {list(self.members)}\n"
                f"  for example:\n{steps}")


def find_cycles(tree: Tree) -> list[Cycle]:
    """Every import cycle (strongly connected component) of the module-level graph."""
    graph = import_graph(tree)
    cycles = []
    for component in strongly_connected(graph):
        first = component[0]
        if len(component) == 1 and first not in graph[first]:
            continue
        # the shortest cycle through any member, as the readable example
        paths = [p for p in (shortest_cycle_through(graph, m) for m in component) if p]
        path = min(paths, key=len)
        lines = tuple(f"{module_path(a, tree)}:{graph[a][b]}" for a, b in zip(path, path[1:]))
        cycles.append(Cycle(tuple(component), tuple(path), lines))
    return cycles


# ----------------------------------------------------------------------------- function imports

def check_function_imports(tree: Tree) -> list[Violation]:
    """rpd_mpi imports inside functions, except `ALLOWED_FUNCTION_IMPORTS`."""
    return [_violation(imp, tree, "function",
                       "rpd_mpi imports belong at module level; the only allowed lazy "
                       "imports are " + ", ".join(f"{m}.{f} -> {t}" for m, f, t in
                                                  sorted(ALLOWED_FUNCTION_IMPORTS)))
            for imp in all_imports(tree)
            if imp.internal and not imp.module_level
            and (imp.module, imp.function, imp.target) not in ALLOWED_FUNCTION_IMPORTS]


def check_allowlist_used(tree: Tree) -> list[str]:
    """Entries of the allowlist that no longer match a function import of the tree."""
    seen = {(imp.module, imp.function, imp.target) for imp in all_imports(tree)
            if not imp.module_level}
    return [f"{m}.{f} -> {t}: allowed but not found inside that function ({module_path(m, tree)})"
            for m, f, t in sorted(ALLOWED_FUNCTION_IMPORTS - seen)]


# ----------------------------------------------------------------------------- layer rules

CORE = ("rpd_mpi.schedule", "rpd_mpi.engines", "rpd_mpi.objectives")
CORE_FORBIDDEN = ("rpd_mpi.mpi", "rpd_mpi.ledger", "rpd_mpi.analysis", "rpd_mpi.experiments",
                  "rpd_mpi.cli", "rpd_mpi.commands", "rpd_mpi.build", "rpd_mpi.flags",
                  "rpd_mpi.entry")
SCHEDULE_ALLOWED = ("rpd_mpi.schedule", "rpd_mpi.records", "rpd_mpi.config")
MPI4PY_IMPORTERS = ("rpd_mpi.mpi.comm", "rpd_mpi.mpi.comm_links", "rpd_mpi.mpi.comm_gpu")
TOOL_PACKAGES = ("rpd_mpi.analysis", "rpd_mpi.experiments")
TOOL_FORBIDDEN = ("rpd_mpi.cli", "rpd_mpi.commands", "rpd_mpi.entry", "rpd_mpi.mpi")
FRONT = ("rpd_mpi.cli", "rpd_mpi.commands", "rpd_mpi.entry")
FRONT_TARGETS = ("rpd_mpi.cli", "rpd_mpi.commands")


def _any_in(name: str, packages: Iterable[str]) -> bool:
    return any(in_package(name, p) for p in packages)


@dataclass(frozen=True)
class Rule:
    name: str
    applies: Callable[[Import], bool]       # the import breaks the rule
    why: str


LAYER_RULES: tuple[Rule, ...] = (
    Rule("core", lambda i: _any_in(i.module, CORE) and _any_in(i.target, CORE_FORBIDDEN),
         "schedule/engines/objectives never import the MPI runtime, the ledger, the tools or "
         "the front end (" + ", ".join(CORE_FORBIDDEN) + ")"),
    Rule("schedule", lambda i: in_package(i.module, "rpd_mpi.schedule") and i.internal
         and not _any_in(i.target, SCHEDULE_ALLOWED),
         "rpd_mpi.schedule imports only " + ", ".join(SCHEDULE_ALLOWED)),
    Rule("mpi4py", lambda i: i.top == "mpi4py" and i.module not in MPI4PY_IMPORTERS,
         "only rpd_mpi/mpi/comm.py, rpd_mpi/mpi/comm_links.py and rpd_mpi/mpi/comm_gpu.py import "
         "mpi4py"),
    Rule("h5py", lambda i: i.top == "h5py" and not in_package(i.module, "rpd_mpi.ledger"),
         "only modules in rpd_mpi/ledger/ import h5py"),
    Rule("tools", lambda i: _any_in(i.module, TOOL_PACKAGES) and _any_in(i.target, TOOL_FORBIDDEN),
         "analysis/experiments never import the front end or rpd_mpi.mpi; they read ledgers "
         "through rpd_mpi.ledger"),
    Rule("front", lambda i: _any_in(i.target, FRONT_TARGETS) and i.module not in FRONT,
         "only rpd_mpi.cli, rpd_mpi.commands and rpd_mpi.entry import rpd_mpi.cli or "
         "rpd_mpi.commands"),
    Rule("cupy", lambda i: i.top == "cupy" and i.module_level,
         "cupy is optional: import it inside the function that needs it"),
)


def check_layers(tree: Tree) -> list[Violation]:
    """Every import (module level, TYPE_CHECKING or in a function) against `LAYER_RULES`."""
    return [_violation(imp, tree, rule.name, rule.why)
            for imp in all_imports(tree) for rule in LAYER_RULES if rule.applies(imp)]


# ----------------------------------------------------------------------------- lazy imports

# module -> third-party top-level names its import must not load
IMPORT_TIME_FORBIDDEN: dict[str, tuple[str, ...]] = {
    "rpd_mpi": ("mpi4py",),
    "rpd_mpi.entry": ("mpi4py", "numpy"),
    "rpd_mpi.cli": ("mpi4py",),
    "rpd_mpi.commands": ("mpi4py",),
}


def import_time_closure(tree: Tree, start: str) -> dict[str, list[tuple[str, int]]]:
    """What importing `start` runs: {module or third-party top name: the chain that loads it}.

    A chain is [(start, 0), (module, line of the import in the previous module), ...].
    Module-level, non-TYPE_CHECKING imports only; unlike the cycle graph it includes the
    parent packages' __init__ files, because Python runs them.
    """
    edges: dict[str, list[tuple[str, int]]] = {name: [] for name in tree}
    for imp in all_imports(tree):
        if imp.module_level and not imp.type_checking:
            edges[imp.module].append((imp.target if imp.internal else imp.top, imp.line))
    for name in tree:
        if "." in name:
            edges[name].append((name.rpartition(".")[0], 0))      # the parent __init__
    chains: dict[str, list[tuple[str, int]]] = {start: [(start, 0)]}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child, line in edges.get(node, []):
            if child not in chains:
                chains[child] = [*chains[node], (child, line)]
                if child in tree:
                    queue.append(child)
    return chains


def check_import_time(tree: Tree) -> list[Violation]:
    """`IMPORT_TIME_FORBIDDEN`: reported at `start`'s import that begins the chain."""
    out = []
    for start, forbidden in IMPORT_TIME_FORBIDDEN.items():
        if start not in tree:
            continue
        chains = import_time_closure(tree, start)
        for name in forbidden:
            if name not in chains:
                continue
            chain = chains[name]
            steps = " -> ".join(
                chain[0][0] if i == 0 else
                f"{m} ({module_path(chain[i - 1][0], tree)}:{line})" if line else
                f"{m} (parent package)"
                for i, (m, line) in enumerate(chain))
            out.append(Violation(module_path(start, tree), chain[1][1], "lazy",
                                 f"importing {start} loads {name}: {steps}"))
    return out


def check_all(tree: Tree) -> list[str]:
    """Every problem of a tree as printable lines (empty: the tree is clean)."""
    return [*map(str, find_cycles(tree)), *map(str, check_function_imports(tree)),
            *map(str, check_layers(tree)), *map(str, check_import_time(tree))]


def report(problems: Iterable[object]) -> str:
    lines = [str(p) for p in problems]
    return f"{len(lines)} problem(s):\n" + "\n".join(lines)


# ============================================================================= tests

@pytest.fixture(scope="module")
def tree() -> Tree:
    return load_tree()


def with_line(tree: Tree, module: str, text: str) -> tuple[Tree, int]:
    """A copy of the tree with `text` appended to one module; the line number of its first line."""
    assert module in tree, f"{module} is not in the tree"
    source = tree[module]
    if not source.endswith("\n"):
        source += "\n"
    first = source.count("\n") + 1
    return {**tree, module: source + text}, first


# ----------------------------------------------------------------------------- the real tree

def test_tree_is_read(tree: Tree) -> None:
    """The checker sees the whole package (guards against checking an empty folder)."""
    for name in ("rpd_mpi", "rpd_mpi.entry", "rpd_mpi.cli", "rpd_mpi.commands",
                 "rpd_mpi.schedule.timeline", "rpd_mpi.engines.sim", "rpd_mpi.mpi.comm",
                 "rpd_mpi.ledger.run_file", "rpd_mpi.analysis", "rpd_mpi.experiments.registry"):
        assert name in tree, f"{name} not found under {ROOT / PACKAGE}"
    assert len(import_graph(tree)) == len(tree) > 30
    assert sum(len(e) for e in import_graph(tree).values()) > 50


def test_no_import_cycles(tree: Tree) -> None:
    cycles = find_cycles(tree)
    assert not cycles, report(cycles)


def test_no_rpd_mpi_imports_inside_functions(tree: Tree) -> None:
    violations = check_function_imports(tree)
    assert not violations, report(violations)


def test_allowed_function_imports_exist(tree: Tree) -> None:
    """The allowlist is exact: each entry still is a lazy import of that function."""
    stale = check_allowlist_used(tree)
    assert not stale, report(stale)


def test_layer_rules(tree: Tree) -> None:
    violations = check_layers(tree)
    assert not violations, report(violations)


def test_import_time_closure(tree: Tree) -> None:
    """The lazy imports do their job: the front end loads no MPI, entry loads no numpy."""
    violations = check_import_time(tree)
    assert not violations, report(violations)


# ----------------------------------------------------------------------------- injected faults

def test_cycle_and_layer_violation_are_caught(tree: Tree) -> None:
    bad, line = with_line(tree, "rpd_mpi.schedule.timeline", "import rpd_mpi.cli\n")
    layers = [v for v in check_layers(bad) if v.path == "rpd_mpi/schedule/timeline.py"]
    assert {v.rule for v in layers} >= {"core", "schedule", "front"}, report(layers)
    assert all(v.line == line for v in layers), report(layers)
    cycles = [c for c in find_cycles(bad) if "rpd_mpi.schedule.timeline" in c.members]
    assert cycles, report(find_cycles(bad))
    assert {"rpd_mpi.cli", "rpd_mpi.commands"} <= set(cycles[0].members), str(cycles[0])
    path = shortest_cycle_through(import_graph(bad), "rpd_mpi.schedule.timeline")
    assert path is not None and path[0] == path[-1] == "rpd_mpi.schedule.timeline"
    assert path[1] == "rpd_mpi.cli"
    assert f"rpd_mpi/schedule/timeline.py:{line}" in str(cycles[0]), str(cycles[0])
    assert check_all(bad)


def test_mpi4py_in_engines_is_caught(tree: Tree) -> None:
    bad, line = with_line(tree, "rpd_mpi.engines.sim", "from mpi4py import MPI\n")
    violations = check_layers(bad)
    assert [(v.path, v.line, v.rule) for v in violations] == \
        [("rpd_mpi/engines/sim.py", line, "mpi4py")], report(violations)
    assert "mpi4py" in str(violations[0]) and "comm.py" in str(violations[0])


def test_h5py_outside_ledger_is_caught(tree: Tree) -> None:
    bad, line = with_line(tree, "rpd_mpi.build", "import h5py\n")
    violations = check_layers(bad)
    assert [(v.path, v.line, v.rule) for v in violations] == \
        [("rpd_mpi/build.py", line, "h5py")], report(violations)


def test_rpd_mpi_import_inside_function_is_caught(tree: Tree) -> None:
    # an import the layer rules allow, so only the function rule fires
    injected = "\n\ndef _injected() -> None:\n    from rpd_mpi.schedule import timeline\n"
    bad, line = with_line(tree, "rpd_mpi.schedule.delays", injected)
    violations = check_function_imports(bad)
    assert [(v.path, v.line, v.rule) for v in violations] == \
        [("rpd_mpi/schedule/delays.py", line + 3, "function")], report(violations)
    assert "_injected" in str(violations[0]) and "rpd_mpi.schedule.timeline" in str(violations[0])
    assert not check_layers(bad) and not find_cycles(bad)


def test_eager_front_end_import_is_caught(tree: Tree) -> None:
    """Moving cmd_train's import to module level would load mpi4py with every subcommand."""
    bad, _ = with_line(tree, "rpd_mpi.commands", "import rpd_mpi.mpi.train\n")
    violations = check_import_time(bad)
    assert {v.message.split(":")[0] for v in violations} >= {
        "importing rpd_mpi.commands loads mpi4py", "importing rpd_mpi.cli loads mpi4py"}, \
        report(violations)


# ----------------------------------------------------------------------------- checker semantics

SYNTHETIC: Tree = {
    "rpd_mpi": "",
    "rpd_mpi.pkg": "from rpd_mpi.pkg.a import f\n",
    "rpd_mpi.pkg.a": "import numpy\n\ndef f():\n    import matplotlib\n",
    "rpd_mpi.pkg.b": ("from typing import TYPE_CHECKING\nfrom rpd_mpi.pkg import a, f\n"
                      "from . import a as again\nif TYPE_CHECKING:\n    import rpd_mpi.pkg.c\n"),
    "rpd_mpi.pkg.c": "import rpd_mpi.pkg.b.nothing\n\nclass K:\n    def m(self):\n"
                     "        import rpd_mpi.pkg\n",
}


def test_import_resolution() -> None:
    found = {(i.module, i.target, i.line, i.function, i.type_checking)
             for i in all_imports(SYNTHETIC)}
    assert ("rpd_mpi.pkg.b", "rpd_mpi.pkg.a", 2, None, False) in found   # submodule
    assert ("rpd_mpi.pkg.b", "rpd_mpi.pkg", 2, None, False) in found     # attribute of __init__
    assert ("rpd_mpi.pkg.b", "rpd_mpi.pkg.a", 3, None, False) in found   # relative import
    assert ("rpd_mpi.pkg.b", "rpd_mpi.pkg.c", 5, None, True) in found    # TYPE_CHECKING
    assert ("rpd_mpi.pkg.c", "rpd_mpi.pkg.b", 1, None, False) in found   # longest known prefix
    assert ("rpd_mpi.pkg.c", "rpd_mpi.pkg", 5, "K.m", False) in found    # method
    assert ("rpd_mpi.pkg.a", "matplotlib", 4, "f", False) in found       # third party in function


def test_checker_semantics() -> None:
    # b -> c only under TYPE_CHECKING, c -> b at module level: no cycle; b -> pkg (the
    # __init__ that re-exports a) is an edge, but pkg.a -> pkg is not implied: no cycle
    assert not find_cycles(SYNTHETIC), report(find_cycles(SYNTHETIC))
    # the method's rpd_mpi import is an error, the function's matplotlib import is not
    assert [(v.path, v.line) for v in check_function_imports(SYNTHETIC)] == \
        [("rpd_mpi/pkg/c.py", 5)]
    b_eager = SYNTHETIC["rpd_mpi.pkg.b"].replace("if TYPE_CHECKING:", "if True:")
    cyclic = {**SYNTHETIC, "rpd_mpi.pkg.b": b_eager}
    cycles = find_cycles(cyclic)
    assert [c.members for c in cycles] == [("rpd_mpi.pkg.b", "rpd_mpi.pkg.c")], report(cycles)
    assert cycles[0].path == ("rpd_mpi.pkg.b", "rpd_mpi.pkg.c", "rpd_mpi.pkg.b")
    assert module_path("rpd_mpi.pkg", SYNTHETIC) == "rpd_mpi/pkg/__init__.py"
    assert module_path("rpd_mpi.pkg.a", SYNTHETIC) == "rpd_mpi/pkg/a.py"
