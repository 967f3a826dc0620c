"""The analyses' figures (PNG, matplotlib imported on first use: the analyses and their JSONL need
no matplotlib)."""

from __future__ import annotations

import math
import os
from typing import Any

from .. import _plotting
from .._plotting import label as _short
from ..io import _tempfiles


def available() -> bool:
    """Whether matplotlib can be imported (the figures need it)."""
    return _plotting.available()


def plot(result: Any, png: str) -> str:
    """Draws ``result`` (an :class:`~fastsoup.analysis.AnalysisResult`) into ``png``; returns the path."""
    plt = _plotting.Figures("the analysis figures")
    draw = {"landscape": _landscape, "interpolate": _interpolate, "pairs": _pairs,
            "ensemble_vs_soup": _ensemble_vs_soup, "count": _count}[result.analysis]
    fig = draw(plt, result)
    folder = os.path.dirname(os.path.abspath(png))
    os.makedirs(folder, exist_ok=True)
    with _tempfiles.replacing(png) as f:  # whole or not at all
        fig.savefig(f, format="png", dpi=150)
    return png


def _landscape(plt, r):
    import numpy as np

    n = r.info["steps"]
    pts = r.points
    u = np.array([p["u"] for p in pts]).reshape(n, n)
    v = np.array([p["v"] for p in pts]).reshape(n, n)
    acc = np.array([100 * p["accuracy"] for p in pts]).reshape(n, n)
    loss = np.array([math.nan if p["loss"] is None else p["loss"] for p in pts]).reshape(n, n)
    panels = [("held-out accuracy (%)", acc, "viridis")]
    if np.isfinite(loss).any():
        panels.append(("held-out loss (log scale)", np.log10(np.where(loss > 0, loss, np.nan)), "magma_r"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.8), squeeze=False)
    marks = r.info["checkpoints"]
    for ax, (label, z, cmap) in zip(axes[0], panels):
        cs = ax.contourf(u, v, z, levels=20, cmap=cmap)
        ax.contour(u, v, z, levels=10, colors="black", linewidths=0.3, alpha=0.5)
        cb = fig.colorbar(cs, ax=ax, shrink=0.75)
        cb.set_label(label if "log" not in label else "log10 held-out loss")
        for m, style in zip(marks, (("o", "white"), ("s", "tab:red"), ("^", "tab:orange"))):
            ax.scatter([m["u"]], [m["v"]], marker=style[0], c=style[1], s=80, edgecolors="black", zorder=5,
                       label=f"{m['label']}: {_short(m['name'])}")
            ax.annotate(m["label"], (m["u"], m["v"]), textcoords="offset points", xytext=(6, 6), fontsize=10,
                        color="white", fontweight="bold")
        # To scale (distances in parameter space) unless the plane is too thin to see that way.
        width, height = float(u.max() - u.min()), float(v.max() - v.min())
        to_scale = height > 0 and 1 / 3 <= width / height <= 3
        ax.set_xlabel("along B - A (parameter-space distance)")
        ax.set_ylabel("across, in the plane of A, B, C" + ("" if to_scale else " (stretched: not to scale)"))
        if to_scale:
            ax.set_aspect("equal", adjustable="box")
        ax.set_title(label.replace(" (log scale)", "") + " on the plane through A, B, C", fontsize=9)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=7, framealpha=0.8)
    fig.tight_layout()
    return fig


def _interpolate(plt, r):
    pts = r.points
    alphas = [p["alpha"] for p in pts]
    a, b = (_short(n) for n in r.names)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(alphas, [100 * p["accuracy"] for p in pts], "o-", c="tab:blue", label="held-out accuracy")
    for name in (pts[0].get("evals") or {}):
        ax.plot(alphas, [100 * p["evals"][name]["accuracy"] for p in pts], "s--", label=f"{name} accuracy")
    ax.set_xlabel(f"alpha: (1 - alpha) * {a} + alpha * {b}")
    ax.set_ylabel("accuracy (%)")
    lines, labels = ax.get_legend_handles_labels()
    if any(p["loss"] is not None for p in pts):
        ax2 = ax.twinx()
        ax2.plot(alphas, [math.nan if p["loss"] is None else p["loss"] for p in pts], "x:", c="tab:red", label="held-out loss")
        ax2.set_ylabel("held-out loss")
        more = ax2.get_legend_handles_labels()
        lines, labels = lines + more[0], labels + more[1]
    ax.legend(lines, labels, loc="best", fontsize=8)
    ax.set_title(f"interpolation from {a} (alpha = 0) to {b} (alpha = 1)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _fit_line(ax, xs, ys, color):
    import numpy as np

    if len(xs) >= 3 and max(xs) > min(xs):
        k, c = np.polyfit(xs, ys, 1)
        grid = np.linspace(min(xs), max(xs), 50)
        ax.plot(grid, k * grid + c, "--", c=color, lw=1, label="least-squares line")


def _r(result) -> str:
    r = result.info.get("pearson_r")
    return "r = n/a" if r is None else f"r = {r:.3f}"


def _pairs(plt, r):
    pts = [p for p in r.points if p["angle"] is not None]  # a task vector with NaN or inf has no angle
    xs, ys = [p["angle"] for p in pts], [100 * p["gain"] for p in pts]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(xs, ys, c="tab:blue", s=30, edgecolors="black", linewidths=0.4, label="pairs of fine-tunes")
    _fit_line(ax, xs, ys, "tab:gray")
    ax.axhline(0, c="black", lw=0.6)
    ax.set_xlabel("angle between task vectors (degrees)")
    ax.set_ylabel("2-soup accuracy - mean of the two (points)")
    left = len(r.points) - len(pts)
    ax.set_title(f"soup gain against the angle of the fine-tunes ({len(pts)} pairs, {_r(r)})"
                 + (f"\n{left} pairs without an angle (non-finite task vector) not shown" if left else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def _ensemble_vs_soup(plt, r):
    pts = r.points
    xs, ys = [100 * p["ensemble_gain"] for p in pts], [100 * p["soup_gain"] for p in pts]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(xs, ys, c="tab:purple", s=30, edgecolors="black", linewidths=0.4, label="pairs of fine-tunes")
    if xs:
        lo, hi = min(xs + ys), max(xs + ys)
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], c="gray", lw=0.8, label="soup = ensemble")
    ax.set_xlabel("2-ensemble accuracy - mean of the two (points)")
    ax.set_ylabel("2-soup accuracy - mean of the two (points)")
    ax.set_title(f"soup against ensemble for every pair ({len(pts)} pairs, {_r(r)})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def _count(plt, r):
    rows = r.points
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for kind, style, color in (("uniform", "o-", "tab:blue"), ("greedy", "*-", "tab:red")):
        sel = [p for p in rows if p["kind"] == kind]
        ax.plot([p["n"] for p in sel], [100 * p["accuracy"] for p in sel], style, c=color, label=f"{kind} soup")
    uni = [p for p in rows if p["kind"] == "uniform"]
    ax.scatter([p["n"] for p in uni], [100 * p["added_accuracy"] for p in uni], c="tab:gray", s=20,
               label="the n-th ingredient alone", zorder=3)
    ax.set_xlabel("number of ingredients n (in held-out order, best first)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("greedy and uniform soups of the first n ingredients", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


__all__ = ["available", "plot"]
