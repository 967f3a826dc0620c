"""Loads the native core, ``fastsoup._core``, or fails loudly with the command that builds it."""

from __future__ import annotations

try:
    from fastsoup import _core  # noqa: F401  (re-exported)
except ImportError as e:  # pragma: no cover - exercised by hand on a broken build
    raise ImportError(
        "fastsoup's native core (fastsoup._core) is not built or does not load: "
        f"{e}.\nBuild it from the source folder with:  pip install -e '.[test]'   "
        "(or: python setup.py build_ext --inplace)"
    ) from e

__all__ = ["_core"]
