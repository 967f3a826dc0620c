"""The paper-style figure of a results.jsonl (``fastsoup plot``, the demo's ``soups.png``): what it shows,
read from the matplotlib Figure (no pixels)."""

from __future__ import annotations

import builtins
import json

import pytest

from fastsoup.report import MatplotlibMissing, plot_results, results_figure

HELDOUT = [0.95, 0.926, 0.95, 0.902, 0.95, 0.082, 0.952, 0.914, 0.926, 0.95, 0.91, 0.952]
TEST = [0.939, 0.893, 0.936, 0.89, 0.932, 0.09, 0.939, 0.901, 0.908, 0.942, 0.9, 0.936]
SHIFT = [0.393, 0.43, 0.373, 0.459, 0.367, 0.09, 0.373, 0.453, 0.407, 0.37, 0.438, 0.381]


def _rows() -> list[dict]:
    rows = [{"name": f"zoo/ft-{i:02d}.safetensors", "kind": "individual", "fingerprint": str(i),
             "heldout": h, "test": t, "shift": s} for i, (h, t, s) in enumerate(zip(HELDOUT, TEST, SHIFT))]
    for name, kind, h, t, s in [("uniform soup", "uniform_soup", 0.61, 0.61, 0.398),
                                ("greedy soup", "greedy_soup", 0.954, 0.939, 0.378),
                                ("learned soup", "learned_soup", 0.944, 0.931, 0.398),
                                ("uniform ensemble", "uniform_ensemble", 0.948, 0.936, 0.436),
                                ("greedy ensemble", "greedy_ensemble", 0.954, 0.945, 0.434)]:
        rows.append({"name": name, "kind": kind, "members": [0], "heldout": h, "test": t, "shift": s})
    return rows


def _no_matplotlib(monkeypatch):
    real = builtins.__import__

    def imp(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", imp)


def test_two_panels_held_out_on_x_zoomed_on_the_models_off_scale_points_named_at_the_edge():
    pytest.importorskip("matplotlib")
    from matplotlib.text import Text

    fig = results_figure(_rows(), x="heldout", y=["test", "shift"], title="the title")
    axes = fig.axes
    assert len(axes) == 2
    assert fig._suptitle.get_text() == "the title"
    assert [ax.get_xlabel() for ax in axes] == ["held-out accuracy (%)"] * 2
    assert [ax.get_ylabel() for ax in axes] == ["test accuracy (%)", "shift accuracy (%)"]
    assert all(ax.get_title() for ax in axes)
    renderer = fig.canvas.get_renderer()
    for ax, points, y in zip(axes, fig.fastsoup_points, (TEST, SHIFT)):
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        # zoomed: every model but the collapsed one (ft-05) is inside, the collapsed one and the
        # uniform soup it ruined are not, and the axes are not stretched to them
        good = [i for i in range(12) if i != 5]
        assert x0 <= min(100 * HELDOUT[i] for i in good) and max(100 * HELDOUT[i] for i in good) <= x1
        assert y0 <= min(100 * y[i] for i in good) and max(100 * y[i] for i in good) <= y1
        assert x0 > 61 and x1 - x0 < 10
        off = {p["name"] for p in points if p["off_scale"]}
        assert off == {"zoo/ft-05.safetensors", "uniform soup"}
        texts = [t.get_text() for t in ax.texts]
        assert any("ft-05: 8.2, " in t for t in texts) and any(t.startswith("\u2199 ft-05") for t in texts)
        assert any("uniform soup: 61.0, " in t for t in texts)
        for p in points:  # off-scale points drawn on the edge
            if p["off_scale"]:
                assert x0 - 1e-6 <= p["at"][0] <= x1 + 1e-6 and y0 - 1e-6 <= p["at"][1] <= y1 + 1e-6
        # soups and ensembles named, the best individual model too (the greedy soup's start)
        for name in ("greedy soup", "learned soup", "uniform ensemble", "greedy ensemble"):
            assert name in texts
        assert "best individual (ft-06)" in texts
        # the labels stay inside the panel and do not overlap each other
        frame = ax.get_window_extent(renderer)
        for t in ax.texts:
            t.update_positions(renderer)
        boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the text, not a leader line
        for k, a in enumerate(boxes):
            assert frame.x0 - 1 <= a.x0 and a.x1 <= frame.x1 + 1 and frame.y0 - 1 <= a.y0 and a.y1 <= frame.y1 + 1
            assert not any(a.overlaps(b) for b in boxes[k + 1:]), texts[k]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "fine-tuned models" in legend and "greedy soup" in legend


def test_plot_defaults_to_a_panel_per_eval_set_and_skips_rows_without_a_score(tmp_path, recwarn):
    pytest.importorskip("matplotlib")
    rows = _rows()
    del rows[-1]["shift"]  # the greedy ensemble scored by a run without --eval shift
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = results_figure(rows)
    assert [ax.get_ylabel() for ax in fig.axes] == ["test accuracy (%)", "shift accuracy (%)"]
    assert "greedy ensemble" not in {p["name"] for p in fig.fastsoup_points[1]}
    assert any("greedy ensemble" in str(w.message) and "'shift'" in str(w.message) for w in recwarn)
    png = tmp_path / "fig.png"
    assert plot_results(str(results), str(png), y="shift") == str(png)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_few_models_no_zoom():
    pytest.importorskip("matplotlib")
    rows = [r for r in _rows() if r["kind"] != "individual" or r["name"].endswith(("00.safetensors", "05.safetensors"))]
    fig = results_figure(rows, y="test")
    assert len(fig.axes) == 1 and not any(p["off_scale"] for p in fig.fastsoup_points[0])


def test_without_matplotlib_the_error_says_how_to_get_it(tmp_path, monkeypatch):
    _no_matplotlib(monkeypatch)
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    with pytest.raises(MatplotlibMissing, match="pip install matplotlib"):
        plot_results(str(results), str(tmp_path / "fig.png"))
    assert not (tmp_path / "fig.png").exists()
