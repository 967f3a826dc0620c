"""matplotlib for fastsoup's figures, imported on first use and without pyplot (no global state, no GUI
backend): the one place that imports it. Nothing else of fastsoup needs matplotlib."""

from __future__ import annotations

import os
from typing import Any

from ._errors import MatplotlibMissing

HINT = "pip install matplotlib"  # the one that works with any install of fastsoup (extras: [plot], [demo])


def available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def figure_class(what: str = "the figure") -> Any:
    """matplotlib's ``Figure`` (its ``savefig`` writes PNGs through the Agg canvas, no pyplot).

    Raises:
        MatplotlibMissing: matplotlib is not installed; the message names ``what`` and the pip command.
    """
    try:
        import matplotlib  # noqa: F401  (first: a stub of a missing package fails here)
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing(f"{what} needs matplotlib: {HINT}") from None
    return Figure


def label(name: str) -> str:
    """A checkpoint's label in a figure: its file name without the extension (``zoo/ft-05.safetensors``: ft-05)."""
    base = os.path.basename(name.rstrip("/" + os.sep)) or name
    for ext in (".safetensors", ".pth.tar", ".pt", ".pth", ".bin", ".ckpt"):
        if base.endswith(ext) and len(base) > len(ext):
            return base[: -len(ext)]
    return base


class Figures:
    """pyplot's ``subplots`` on ``Figure``, for code written against pyplot: ``Figures(what).subplots(...)``."""

    def __init__(self, what: str = "the figure"):
        self._figure = figure_class(what)

    def subplots(self, nrows: int = 1, ncols: int = 1, *, figsize: Any = None, squeeze: bool = True):
        fig = self._figure(figsize=figsize)
        return fig, fig.subplots(nrows, ncols, squeeze=squeeze)
