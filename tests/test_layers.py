"""The package's layering (README, "Layout"), checked on the source: no import cycles, no module
importing one of a layer above it, and the torch.distributed plug-in out of io, engine and soup.

The graph comes from ``tools/import_graph.py`` (function-level imports count too: a lazy import
that goes up is still a dependency that goes up)."""

from __future__ import annotations

import fnmatch
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("import_graph", os.path.join(ROOT, "tools", "import_graph.py"))
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)

# Bottom to top. A module may import its own layer and those below. The distributed plug-in's modules
# sit where they plug in: comm at the bottom (torch-free, nothing of fastsoup but errors), the output
# sink beside the soup (the engine gets it injected), evaluation and cache in the search machinery,
# launch with the command line.
LAYERS = [
    ("base", ["fastsoup._version", "fastsoup._errors", "fastsoup._dtypes", "fastsoup._native", "fastsoup._core",
              "fastsoup._reference", "fastsoup._torch", "fastsoup._plotting", "fastsoup.distributed",
              "fastsoup.distributed.comm"]),
    ("methods", ["fastsoup.methods", "fastsoup.methods.*"]),  # merge methods: specs, configs, RNG, selection
    ("io", ["fastsoup.io", "fastsoup.io.*"]),
    ("engine", ["fastsoup.engine", "fastsoup.engine.*", "fastsoup.diagnostics"]),
    ("soup", ["fastsoup.soup", "fastsoup.mixing", "fastsoup.distributed.output"]),
    ("search", ["fastsoup.search", "fastsoup.search.*", "fastsoup.distributed.evaluation", "fastsoup.distributed.cache"]),
    ("recipes", ["fastsoup.recipes", "fastsoup.recipes.*"]),
    ("api", ["fastsoup"]),  # the facade: re-exports every layer, installs the plug-in
    ("cli", ["fastsoup.report", "fastsoup.analysis", "fastsoup.analysis.*", "fastsoup.demo", "fastsoup.cli", "fastsoup.__main__", "fastsoup.distributed.launch"]),
]
NO_DISTRIBUTED = ["fastsoup.io", "fastsoup.io.*", "fastsoup.engine", "fastsoup.engine.*", "fastsoup.soup", "fastsoup.mixing"]


def _layer(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: place it (and in the README's layout)")


@pytest.fixture(scope="module")
def graph():
    return import_graph.graph()


def test_no_import_cycles(graph):
    assert import_graph.cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    g = {"a": {"b": False}, "b": {"c": True}, "c": {"a": False}, "d": {"a": False}}
    assert import_graph.cycles(g) == [["a", "b", "c"]]


def test_every_module_has_a_layer_and_imports_none_above_it(graph):
    up = []
    for module, targets in graph.items():
        for target in targets:
            if _layer(target) > _layer(module):
                up.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
    assert up == []


def test_io_engine_and_soup_never_import_distributed(graph):
    bad = [f"{m} imports {t}" for m, targets in graph.items() if any(fnmatch.fnmatchcase(m, p) for p in NO_DISTRIBUTED)
           for t in targets if t == "fastsoup.distributed" or t.startswith("fastsoup.distributed.")]
    assert bad == []


def test_the_graph_sees_relative_and_lazy_imports(graph):
    """The parser itself: a module-level relative import, a function-level one, ``from . import x``."""
    assert graph["fastsoup.soup"]["fastsoup.engine"] is False  # from .engine import ... (module level)
    assert graph["fastsoup.soup"]["fastsoup._torch"] is True  # from . import _torch, inside methods only
    assert "fastsoup.distributed.comm" in graph["fastsoup.recipes.greedy"]  # from ..distributed import comm
