"""Prints the import graph of the fastsoup package: for each module, the package modules it imports.

    python tools/import_graph.py            # module -> imports (lazy, function-level imports marked *)
    python tools/import_graph.py --cycles   # the cycles, if any (exit status 1 when there are some)
    python tools/import_graph.py --root OTHER/fastsoup   # another checkout's package

It reads the source (``ast``), so it runs without building or importing anything. ``tests/test_layers.py``
uses :func:`graph` to check the layering (README, "Layout").
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastsoup")


def modules(root: str = ROOT) -> dict[str, str]:
    """Module name -> path of every ``.py`` file of the package (``fastsoup.io`` for ``io/__init__.py``)."""
    out = {}
    base = os.path.dirname(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        for f in sorted(filenames):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                parts = os.path.relpath(path, base)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    out["fastsoup._core"] = ""  # the native extension (csrc/): imports nothing of the package
    return out


def _resolve(name: str, mods: dict[str, str]) -> str | None:
    """The package module ``name`` refers to: itself, or the closest enclosing module (an attribute)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def graph(root: str = ROOT) -> dict[str, dict[str, bool]]:
    """Module -> {imported package module: lazy?}; lazy means every import of it is inside a function."""
    mods = modules(root)
    out: dict[str, dict[str, bool]] = {}
    for mod, path in mods.items():
        if not path:
            out[mod] = {}
            continue
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges: dict[str, bool] = {}
        _visit(tree, False, mod, package, mods, edges)
        out[mod] = dict(sorted(edges.items()))
    return out


def _visit(node: ast.AST, lazy: bool, mod: str, package: str, mods: dict, edges: dict) -> None:
    """Adds the package imports under ``node`` to ``edges`` (target -> lazy: only inside functions)."""
    for child in ast.iter_child_nodes(node):
        targets: list = []
        if isinstance(child, ast.Import):
            targets = [_resolve(a.name, mods) for a in child.names if a.name.split(".")[0] == "fastsoup"]
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                base = package.split(".")
                base = base[: len(base) - (child.level - 1)]
                src = ".".join(base + ([child.module] if child.module else []))
            else:
                src = child.module or ""
            if src.split(".")[0] == "fastsoup":  # `from . import x`: the module x when there is one
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else _resolve(src, mods) for a in child.names]
        for target in targets:
            if target is not None and target != mod:
                edges[target] = edges.get(target, True) and lazy
        inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        _visit(child, inner, mod, package, mods, edges)


def cycles(g: dict[str, dict[str, bool]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, {}):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            strong(v)
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", action="store_true", help="print only the import cycles")
    p.add_argument("--root", default=ROOT, help="the package folder (default: this checkout's fastsoup/)")
    args = p.parse_args(argv)
    g = graph(args.root)
    found = cycles(g)
    if not args.cycles:
        for mod, edges in g.items():
            shown = ", ".join(t.replace("fastsoup.", "", 1) + ("*" if lazy else "") for t, lazy in edges.items())
            print(f"{mod}: {shown}")
        print(f"\n{len(g)} modules; {len(found)} import cycle(s) (* = imported inside a function only)")
    for comp in found:
        print("cycle: " + " <-> ".join(comp))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
