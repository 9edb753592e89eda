"""The import graph of ``ww_core`` and ``ww_callbacks`` (docs/architecture.md, "Public API").

Every module is parsed with ``ast`` (nothing is imported, so no torch is needed); module-level
and function-level imports count alike, and so does ``importlib.import_module("...")``:

* (a) no import cycle among the ``ww_core`` modules (the failure names the cycle's path);
* (b) no ``ww_core`` module imports ``ww_callbacks``;
* (c) ``ww_callbacks`` uses only ``ww_core``'s public API: names in ``ww_core.__all__``, or a
  submodule documented as public (:data:`PUBLIC_SUBMODULES`), by import or ``ww_core.<name>``;
* (d) no ``ww_core`` module imports another one's ``_private`` names (nor reads them through a
  module alias), except from a module whose name says it is internal (``ww_core._something``);
* every name of ``ww_core.__all__`` is listed in docs/architecture.md's "Public API".
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

pytestmark = pytest.mark.core

REPO = Path(__file__).resolve().parents[1]

#: Submodules of ``ww_core`` that are public API besides ``ww_core.__all__``, with the reason;
#: a name imported from one must be in that module's own ``__all__``.
PUBLIC_SUBMODULES = {
    "ww_core.plots": "README 'Quickstart': ww_core.plots.plot_esd / plot_alphas / save_plots",
}


@dataclass(frozen=True)
class Import:
    """One import in ``module`` (line ``line``): of ``target`` (a module), or of ``name`` from it."""

    module: str
    line: int
    target: str
    name: Optional[str] = None


def module_files(package: str, root: Path = REPO) -> Dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``package`` (the package is its
    ``__init__``)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _package_of(module: str, is_package: bool, level: int) -> str:
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(level - 1):
        base = base.rpartition(".")[0]
    return base


def imports_of(module: str, source: str, is_package: bool, known: Set[str]) -> List[Import]:
    """Every import in ``source`` (at any depth). ``from pkg import sub`` of a module ``pkg.sub``
    in ``known`` is an import of that module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(module, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _package_of(module, is_package, node.level)
                base = f"{pkg}.{base}" if base else pkg
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(Import(module, node.lineno, sub) if sub in known
                             else Import(module, node.lineno, base, alias.name))
        elif isinstance(node, ast.Call) and _dotted(node.func) in ("importlib.import_module", "__import__"):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append(Import(module, node.lineno, arg.value))
    return found


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def module_aliases(source: str, known: Set[str], module: str, is_package: bool) -> Dict[str, str]:
    """Local names bound to a module of ``known`` (``from . import peft as _peft``,
    ``import ww_core.x as y``, ``y = importlib.import_module("ww_core.x")``) -> that module."""
    aliases = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in known:
                    aliases[alias.asname] = alias.name
                elif not alias.asname and alias.name.partition(".")[0] in known:
                    aliases[alias.name.partition(".")[0]] = alias.name.partition(".")[0]
        elif isinstance(node, ast.ImportFrom):
            for imp in imports_of(module, ast.unparse(node), is_package, known):
                if imp.name is None:
                    local = node.names[[a.name for a in node.names].index(imp.target.rpartition(".")[2])]
                    aliases[local.asname or local.name] = imp.target
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            for imp in imports_of(module, ast.unparse(node.value), is_package, known):
                for target in node.targets:
                    if isinstance(target, ast.Name) and imp.target in known:
                        aliases[target.id] = imp.target
    return aliases


def attribute_uses(source: str, aliases: Dict[str, str]) -> Iterator[Tuple[int, str, str]]:
    """``(line, module, attribute)`` of every ``alias.attribute`` read in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            yield node.lineno, aliases[node.value.id], node.attr


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The shortest cycle (``[a, b, ..., a]``) through each module that is on one."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def visit(v: str) -> None:                   # Tarjan; the graphs here are small
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles: List[List[str]] = []
    for comp in components:
        members = set(comp)
        if len(comp) == 1 and comp[0] not in graph.get(comp[0], ()):
            continue
        for start in sorted(members):             # the shortest cycle through each member
            cycle = _shortest_cycle(graph, start, members)
            i = cycle.index(min(cycle))
            canonical = cycle[i:-1] + cycle[:i] + [cycle[i]]
            if canonical not in cycles:
                cycles.append(canonical)
    return cycles


def _shortest_cycle(graph: Dict[str, Set[str]], start: str, members: Set[str]) -> List[str]:
    paths = {w: [start, w] for w in sorted(graph[start] & members)}
    frontier = list(paths)
    while start not in paths:                     # breadth-first, inside the component
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, set()) & members):
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return paths[start]


def public_names(path: Path) -> Set[str]:
    """The literal ``__all__`` of a module file."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


# ----------------------------------------------------------------------------------- the graph

CORE = module_files("ww_core")
CALLBACKS = module_files("ww_callbacks")
KNOWN = set(CORE) | set(CALLBACKS)
CORE_ALL = public_names(CORE["ww_core"])


def _source(files: Dict[str, Path], module: str) -> str:
    return files[module].read_text(encoding="utf-8")


def _imports(files: Dict[str, Path]) -> List[Import]:
    return [imp for module, path in files.items()
            for imp in imports_of(module, _source(files, module), path.name == "__init__.py", KNOWN)]


def _where(imp: Import, files: Dict[str, Path]) -> str:
    return f"{files[imp.module].relative_to(REPO)}:{imp.line}"


def core_graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {m: set() for m in CORE}
    for imp in _imports(CORE):
        if imp.target in CORE:
            graph[imp.module].add(imp.target)
    return graph


def _is_internal(module: str) -> bool:
    return any(part.startswith("_") for part in module.split("."))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# ----------------------------------------------------------------------------------- the checks

def test_the_scanner_sees_function_level_imports_and_cycles():
    """The checks below are not vacuous: lazy and relative imports are found, cycles reported."""
    source = "def f():\n    from .b import _x\n    from . import c as _c\n    return _c._y\n"
    found = imports_of("p.a", source, False, {"p.a", "p.b", "p.c"})
    assert found == [Import("p.a", 2, "p.b", "_x"), Import("p.a", 3, "p.c")]
    aliases = module_aliases(source, {"p.a", "p.b", "p.c"}, "p.a", False)
    assert list(attribute_uses(source, aliases)) == [(4, "p.c", "_y")]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    assert {"ww_core", "ww_core.analyze", "ww_core.sources"} <= set(CORE)
    assert any(imp.target == "ww_core.analyze" for imp in _imports(CORE))


def test_ww_core_has_no_import_cycle():
    cycles = find_cycles(core_graph())
    assert not cycles, "import cycles in ww_core:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_ww_core_never_imports_ww_callbacks():
    bad = [f"{_where(imp, CORE)}: {imp.target}" for imp in _imports(CORE)
           if imp.target.partition(".")[0] == "ww_callbacks"]
    assert not bad, "ww_core imports ww_callbacks:\n" + "\n".join(bad)


def _check_public(module: str, target: str, name: Optional[str]) -> Optional[str]:
    """Why importing ``name`` (or the module ``target``) from ww_core is not public, else None."""
    if target == "ww_core":
        return None if name is None or name in CORE_ALL else f"{name} is not in ww_core.__all__"
    if target not in PUBLIC_SUBMODULES:
        what = f"{name} from {target}" if name else target
        return f"{what}: {target} is not a public module of ww_core (docs/architecture.md, Public API)"
    if name is not None and name not in public_names(CORE[target]):
        return f"{name} is not in {target}.__all__"
    return None


def test_ww_callbacks_uses_only_the_public_api_of_ww_core():
    bad = []
    for imp in _imports(CALLBACKS):
        if imp.target.partition(".")[0] == "ww_core":
            why = _check_public(imp.module, imp.target, imp.name)
            if why:
                bad.append(f"{_where(imp, CALLBACKS)}: {why}")
    for module, path in CALLBACKS.items():
        source = _source(CALLBACKS, module)
        bound = module_aliases(source, set(CORE), module, path.name == "__init__.py")
        aliases = {k: v for k, v in bound.items() if v == "ww_core" or v in PUBLIC_SUBMODULES}
        for line, target, attr in attribute_uses(source, aliases):
            if target == "ww_core" and attr not in CORE_ALL and f"ww_core.{attr}" not in PUBLIC_SUBMODULES:
                bad.append(f"{path.relative_to(REPO)}:{line}: ww_core.{attr} is not in ww_core.__all__")
    assert not bad, "ww_callbacks reaches past ww_core's public API:\n" + "\n".join(bad)


def test_no_private_name_crosses_ww_core_modules():
    bad = [f"{_where(imp, CORE)}: {imp.name} from {imp.target}" for imp in _imports(CORE)
           if imp.name and _private(imp.name) and imp.target in CORE and imp.target != imp.module
           and not _is_internal(imp.target)]
    for module, path in CORE.items():
        source = _source(CORE, module)
        aliases = module_aliases(source, set(CORE), module, path.name == "__init__.py")
        bad += [f"{path.relative_to(REPO)}:{line}: {target}.{attr}"
                for line, target, attr in attribute_uses(source, aliases)
                if _private(attr) and target != module and not _is_internal(target)]
    assert not bad, "private names used across ww_core modules:\n" + "\n".join(bad)


def test_every_public_name_is_documented():
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = doc.split("## Public API", 1)[-1].split("\n## ", 1)[0]
    missing = sorted(name for name in CORE_ALL if f"`{name}`" not in section)
    assert not missing, f"in ww_core.__all__ but not in docs/architecture.md's Public API: {missing}"
    for module, reason in PUBLIC_SUBMODULES.items():
        assert f"`{module}`" in section, f"{module} ({reason}) is not named in the Public API section"

