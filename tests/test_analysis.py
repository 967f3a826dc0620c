"""fastsoup.analysis and `fastsoup analyze`, each analysis checked against plain evaluation
(``load_state_dict`` + a full pass in plain torch) on the tiny zoo of ``_tiny``: the landscape's grid
points at A, B, C are the individual models and its midpoint of A, B their 2-soup; the ensemble is the
mean of the logits; the angles are those plain torch computes; the uniform rows of ``count`` are plain
uniform soups and its greedy rows the greedy recipe's soups of the first n ingredients."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

import _tiny  # noqa: E402

import fastsoup  # noqa: E402
from fastsoup import analysis, cli  # noqa: E402
from fastsoup.analysis import Analyzer  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with _tiny.one_thread():
        yield


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    z = _tiny.build_zoo(root)
    base = str(root / "init.safetensors")
    fastsoup.save(z.init, base)
    return z, base


# --- plain evaluation ------------------------------------------------------------------------------


def _logits(zoo, sd) -> torch.Tensor:
    return _tiny.logits_of(zoo.model(), sd, zoo.heldout)


def _labels(zoo) -> torch.Tensor:
    return torch.cat([y for _, y in zoo.heldout])


def _plain(zoo, sd) -> tuple[float, float]:
    """(accuracy, loss) of ``sd`` by load_state_dict + a full pass."""
    return _scores(_logits(zoo, sd), _labels(zoo))


def _scores(logits, labels) -> tuple[float, float]:
    acc = int((logits.argmax(-1) == labels).sum()) / labels.shape[0]
    return acc, float(torch.nn.functional.cross_entropy(logits.double(), labels))


def _mix(sds, weights) -> dict:
    """sum_k w_k sd_k, in float64, rounded once to float32."""
    return {n: sum(w * sd[n].double() for sd, w in zip(sds, weights)).float() for n in sds[0]}


def _uniform(sds) -> dict:
    """The plain uniform soup: the float32 sum in order, divided by n."""
    out = {}
    for n in sds[0]:
        total = sds[0][n].clone()
        for sd in sds[1:]:
            total = total + sd[n]
        out[n] = total / len(sds)
    return out


def _row(result, **coords) -> dict:
    found = [r for r in result.points if all(r[k] == v for k, v in coords.items())]
    assert len(found) == 1, coords
    return found[0]


# --- landscape -------------------------------------------------------------------------------------


def test_landscape_grid_points_are_the_models_and_the_midpoint_their_2_soup(zoo):
    z, base = zoo
    a, b = z.state_dicts[0], z.state_dicts[1]
    r = analysis.landscape(base, z.paths[0], z.paths[1], z.model(), z.heldout, steps=5, progress=False)
    assert r.analysis == "landscape" and len(r.points) == 25
    assert [p["x"] for p in r.points[:5]] == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert r.names == [base, z.paths[0], z.paths[1]]
    for (x, y), sd in (((0.0, 0.0), z.init), ((1.0, 0.0), a), ((0.0, 1.0), b)):
        row = _row(r, x=x, y=y)
        assert (row["accuracy"], row["loss"]) == _plain(z, sd), (x, y)
    # the midpoint of B and C: (x, y) = (0.5, 0.5) is (B + C) / 2, their 2-soup
    mid = _row(r, x=0.5, y=0.5)
    assert mid["weights"] == [0.0, 0.5, 0.5]
    assert (mid["accuracy"], mid["loss"]) == _plain(z, _uniform([a, b]))
    # the midpoint of A and B, and an extrapolated point, as plain weighted sums
    for (x, y) in ((0.5, 0.0), (1.5, -0.5)):
        row = _row(r, x=x, y=y)
        assert (row["accuracy"], row["loss"]) == _plain(z, _mix([z.init, a, b], row["weights"]))
    for row in r.points:
        assert row["names"] == r.names and row["kind"] == "point"
        assert row["weights"] == [round(1 - row["x"] - row["y"], 12) + 0.0, row["x"], row["y"]]
        assert set(row) == {"analysis", "kind", "x", "y", "u", "v", "weights", "names", "accuracy", "loss"}


def test_landscape_span_0_1_puts_the_models_at_the_corners_and_the_plane_coordinates(zoo):
    z, base = zoo
    r = analysis.landscape(z.paths[0], z.paths[1], z.paths[2], z.model(), z.heldout, steps=3, span=(0, 1),
                           progress=False)
    for (x, y), sd in (((0.0, 0.0), 0), ((1.0, 0.0), 1), ((0.0, 1.0), 2)):
        row = _row(r, x=x, y=y)
        assert (row["accuracy"], row["loss"]) == _plain(z, z.state_dicts[sd])
    # (u, v): orthonormal coordinates in the plane, from plain torch
    flat = [torch.cat([sd[n].double().flatten() for n in sd]) for sd in z.state_dicts[:3]]
    ab, ac = flat[1] - flat[0], flat[2] - flat[0]
    along = float(ac @ ab) / float(ab.norm())
    across = math.sqrt(float(ac @ ac) - along ** 2)
    b_row, c_row = _row(r, x=1.0, y=0.0), _row(r, x=0.0, y=1.0)
    assert b_row["u"] == pytest.approx(float(ab.norm()), rel=1e-5) and b_row["v"] == 0.0
    assert c_row["u"] == pytest.approx(along, rel=1e-5) and c_row["v"] == pytest.approx(across, rel=1e-5)
    marks = r.info["checkpoints"]
    assert [m["label"] for m in marks] == ["A", "B", "C"] and marks[2]["u"] == c_row["u"]


def test_landscape_errors(zoo):
    z, base = zoo
    an = Analyzer(z.paths[:3], z.model(), z.heldout, progress=False)
    with pytest.raises(fastsoup.ArgumentError, match="three different"):
        an.landscape(0, 0, 1)
    with pytest.raises(fastsoup.ArgumentError, match="steps"):
        an.landscape(steps=1)
    with pytest.raises(fastsoup.ArgumentError, match="span"):
        an.landscape(span=(1, 0))
    with pytest.raises(fastsoup.ArgumentError, match="out of range"):
        an.landscape(0, 1, 5)
    with pytest.raises(fastsoup.ArgumentError, match="base"):
        an.landscape("base", 0, 1)
    with pytest.raises(fastsoup.ArgumentError, match="no checkpoint"):
        an.landscape(0, 1, "nope.safetensors")
    same = Analyzer([z.paths[0], z.paths[0], z.paths[1]], z.model(), z.heldout, progress=False)
    with pytest.raises(fastsoup.ArgumentError, match="same point"):
        same.landscape(0, 1, 2)
    # by file name: the same rows as by index
    r1, r2 = an.landscape(0, 1, 2, steps=3), an.landscape(*(p.rsplit("/", 1)[1] for p in z.paths[:3]), steps=3)
    assert r1.rows == r2.rows
    assert r2.stats["evaluated"] == 0 and r2.stats["seconds_per_soup"] is None  # all from memory


def test_landscape_cache_rerun_evaluates_nothing(zoo, tmp_path):
    z, base = zoo
    args = (base, z.paths[0], z.paths[1])
    r1 = analysis.landscape(*args, z.model(), z.heldout, steps=4, cache_dir=tmp_path / "cache", progress=False)
    assert r1.stats["evaluated"] == 16 and r1.stats["seconds_per_soup"] > 0
    r2 = analysis.landscape(*args, z.model(), None, steps=4, cache_dir=tmp_path / "cache", progress=False)
    assert r2.rows == r1.rows and r2.stats["evaluated"] == 0 and r2.stats["evaluations"] == 0


# --- interpolate -----------------------------------------------------------------------------------


def test_interpolate_endpoints_midpoint_and_the_wise_ft_sweep(zoo):
    z, base = zoo
    alphas = [0.0, 0.5, 1.0, 1.5]
    r = analysis.interpolate(z.paths[0], base, z.model(), z.heldout, alphas=alphas, progress=False)
    assert [p["alpha"] for p in r.points] == alphas and r.names == [z.paths[0], base]
    assert (r.points[0]["accuracy"], r.points[0]["loss"]) == _plain(z, z.state_dicts[0])
    assert (r.points[2]["accuracy"], r.points[2]["loss"]) == _plain(z, z.init)
    assert (r.points[1]["accuracy"], r.points[1]["loss"]) == _plain(z, _uniform([z.state_dicts[0], z.init]))
    assert (r.points[3]["accuracy"], r.points[3]["loss"]) == _plain(z, fastsoup.interpolate(z.paths[0], base, 1.5))
    sweep = fastsoup.wise_ft_sweep(z.paths[0], base, z.model(), z.heldout, alphas=alphas, progress=False)
    assert [p["accuracy"] for p in r.points] == sweep.scores["heldout"]
    default = analysis.interpolate(z.paths[0], base, z.model(), z.heldout, progress=False)
    assert len(default.points) == 21 and default.points[-1]["alpha"] == 1.0 and default.points[10]["alpha"] == 0.5


def test_interpolate_with_an_eval_set(zoo):
    z, base = zoo
    other = _tiny.batches(*_tiny.make_data(130, 9))
    r = analysis.interpolate(z.paths[1], base, z.model(), z.heldout, alphas=[0, 1], evals={"other": other},
                             progress=False)
    for p, sd in zip(r.points, (z.state_dicts[1], z.init)):
        assert (p["evals"]["other"]["accuracy"], p["evals"]["other"]["loss"]) == _scores(
            _tiny.logits_of(z.model(), sd, other), torch.cat([y for _, y in other]))
    with pytest.raises(fastsoup.ArgumentError, match="two different"):
        Analyzer([z.paths[0], base], z.model(), z.heldout, progress=False).interpolate(0, 0)


# --- pairs and ensemble vs soup --------------------------------------------------------------------


PAIRS = [0, 1, 2, 5]  # four fine-tunes: six pairs


def _angle(sd_i, sd_j, init) -> float:
    vi = torch.cat([(sd_i[n].double() - init[n].double()).flatten() for n in init])
    vj = torch.cat([(sd_j[n].double() - init[n].double()).flatten() for n in init])
    return math.degrees(math.acos(float(vi @ vj) / float(vi.norm() * vj.norm())))


def test_pairs_angles_and_gains_against_plain_torch(zoo):
    z, base = zoo
    paths = [z.paths[i] for i in PAIRS]
    sds = [z.state_dicts[i] for i in PAIRS]
    r = analysis.pairs(paths, z.model(), z.heldout, base=base, progress=False)
    assert len(r.points) == 6 and r.rows[-1]["kind"] == "summary"
    acc = [_plain(z, sd)[0] for sd in sds]
    for row in r.points:
        i, j = row["indices"]
        assert row["names"] == [paths[i], paths[j]] and row["base"] == base
        assert row["angle"] == pytest.approx(_angle(sds[i], sds[j], z.init), abs=1e-3)
        soup_acc, soup_loss = _plain(z, _uniform([sds[i], sds[j]]))
        assert (row["accuracy"], row["loss"]) == (soup_acc, soup_loss)
        assert row["individual_accuracy"] == [acc[i], acc[j]]
        assert row["gain"] == soup_acc - (acc[i] + acc[j]) / 2
    import numpy as np

    expected = float(np.corrcoef([p["angle"] for p in r.points], [p["gain"] for p in r.points])[0, 1])
    assert r.summary["pearson_r"] == pytest.approx(expected, abs=1e-9)
    with pytest.raises(fastsoup.ArgumentError, match="base"):
        Analyzer(paths, z.model(), z.heldout, progress=False).pairs()


def test_ensemble_is_the_mean_of_the_logits_and_the_soup_the_2_soup(zoo):
    z, base = zoo
    paths = [z.paths[i] for i in PAIRS]
    sds = [z.state_dicts[i] for i in PAIRS]
    calls = []
    model = z.model()
    forward = model.forward
    model.forward = lambda x: (calls.append(1), forward(x))[1]
    r = analysis.ensemble_vs_soup(paths, model, z.heldout, progress=False)
    # every ingredient and every 2-soup evaluated once; the ensembles cost no evaluation
    assert len(calls) == (len(paths) + 6) * len(z.heldout)
    labels = _labels(z)
    logits = [_logits(z, sd) for sd in sds]
    for row in r.points:
        i, j = row["indices"]
        ens = _scores((logits[i] + logits[j]) / 2, labels)
        assert (row["ensemble_accuracy"], row["ensemble_loss"]) == ens
        assert (row["soup_accuracy"], row["soup_loss"]) == _plain(z, _uniform([sds[i], sds[j]]))
        mean = row["mean_individual_accuracy"]
        assert row["soup_gain"] == row["soup_accuracy"] - mean and row["ensemble_gain"] == ens[0] - mean
    assert r.summary["soup_at_least_ensemble"] == sum(p["soup_accuracy"] >= p["ensemble_accuracy"] for p in r.points)


# --- count -----------------------------------------------------------------------------------------


COUNT = [0, 1, 2, 3, _tiny.DIVERGED]


def test_count_uniform_rows_are_plain_uniform_soups_and_greedy_rows_the_greedy_recipe(zoo):
    z, base = zoo
    paths = [z.paths[i] for i in COUNT]
    sds = [z.state_dicts[i] for i in COUNT]
    r = analysis.count(paths, z.model(), z.heldout, progress=False)
    acc = [_plain(z, sd)[0] for sd in sds]
    ranking = sorted(range(len(paths)), key=lambda i: -acc[i])
    assert r.info["order"] == ranking and r.names == [paths[i] for i in ranking]
    uniform = [p for p in r.points if p["kind"] == "uniform"]
    greedy = [p for p in r.points if p["kind"] == "greedy"]
    assert [p["n"] for p in uniform] == [p["n"] for p in greedy] == list(range(1, len(paths) + 1))
    for p in uniform:
        assert p["members"] == ranking[:p["n"]]
        plain_acc, plain_loss = _plain(z, _uniform([sds[i] for i in p["members"]]))
        assert p["accuracy"] == plain_acc
        # within rounding (the soup's 1/n is a float32 multiplier); a soup with the diverged run: no finite loss
        assert p["loss"] == pytest.approx(plain_loss, rel=1e-6) if math.isfinite(plain_loss) else p["loss"] is None
        assert p["added_accuracy"] == acc[ranking[p["n"] - 1]]
    assert uniform[-1]["accuracy"] < uniform[-2]["accuracy"]  # the diverged run, last in held-out order, ruins it
    for p in greedy:
        g = fastsoup.greedy_soup([paths[i] for i in ranking[:p["n"]]], z.model(), z.heldout, progress=False)
        assert p["members"] == [ranking[i] for i in g.indices] and p["accuracy"] == g.score
    assert _tiny.DIVERGED not in [COUNT[i] for i in greedy[-1]["members"]]


# --- outputs ---------------------------------------------------------------------------------------


def test_write_jsonl_and_plot(zoo, tmp_path):
    pytest.importorskip("matplotlib")
    z, base = zoo
    an = Analyzer(z.paths[:3], z.model(), z.heldout, base=base, progress=False)
    results = [an.landscape("base", 0, 1, steps=3), an.interpolate(0, "base", steps=3), an.pairs(),
               an.ensemble_vs_soup(), an.count()]
    for r in results:
        out, png = tmp_path / f"{r.analysis}.jsonl", tmp_path / f"{r.analysis}.png"
        assert r.write_jsonl(out) == str(out)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert rows == r.rows and all(row["analysis"] == r.analysis for row in rows)
        assert r.plot(png) == str(png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        with pytest.raises(fastsoup.OutputExistsError):
            r.write_jsonl(out)
        r.write_jsonl(out, overwrite=True)
    with pytest.raises(fastsoup.UnsafeOutputError):
        results[0].write_jsonl(tmp_path, overwrite=True)


def test_non_finite_numbers_are_written_as_null(zoo, tmp_path):
    z, base = zoo
    r = analysis.AnalysisResult("pairs", [{"analysis": "pairs", "kind": "pair", "angle": float("nan"),
                                           "loss": float("inf"), "x": [1.0, float("-inf")]}], [])
    assert r.rows[0]["angle"] is None and r.rows[0]["loss"] is None and r.rows[0]["x"] == [1.0, None]
    r.write_jsonl(tmp_path / "r.jsonl")
    assert "NaN" not in (tmp_path / "r.jsonl").read_text()


def test_plot_without_matplotlib_says_how_to_install_it(zoo, tmp_path, monkeypatch):
    z, base = zoo
    r = analysis.interpolate(z.paths[0], base, z.model(), z.heldout, steps=2, progress=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert not analysis.plotting_available()
    with pytest.raises(fastsoup.FastsoupError, match="pip install matplotlib"):
        r.plot(tmp_path / "i.png")
    assert not (tmp_path / "i.png").exists()
    r.write_jsonl(tmp_path / "i.jsonl")  # the rows need no matplotlib
    assert len((tmp_path / "i.jsonl").read_text().splitlines()) == 2


def test_overview_writes_a_small_landscape_and_the_pairs(zoo, tmp_path):
    z, base = zoo
    res = analysis.overview(z.paths[:4], z.model(), z.heldout, tmp_path / "out", base=base, steps=3, progress=False)
    assert set(res) == {"landscape", "pairs"}
    acc = [_plain(z, sd)[0] for sd in z.state_dicts[:4]]
    order = sorted(range(4), key=lambda i: -acc[i])
    good = [i for i in order if acc[i] >= acc[order[0]] - 0.05]  # within 5 points of the best
    assert len(good) >= 2  # the fixture's zoo: else the test checks nothing of the rule
    # C: the good fine-tune whose task vector is most apart from the best's (plain-torch angles)
    far = max(good[1:], key=lambda i: _angle(z.state_dicts[good[0]], z.state_dicts[i], z.init))
    assert res["landscape"].names == [base, z.paths[good[0]], z.paths[far]] and len(res["landscape"].points) == 9
    assert len(res["pairs"].points) == len(good) * (len(good) - 1) // 2
    assert sorted({n for p in res["pairs"].points for n in p["names"]}) == sorted(z.paths[i] for i in good)
    every = analysis.overview(z.paths[:4], z.model(), z.heldout, tmp_path / "all", base=base, steps=3,
                              within=None, progress=False)
    assert len(every["pairs"].points) == 6
    made = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"landscape.jsonl", "pairs.jsonl"} <= made
    if analysis.plotting_available():
        assert {"landscape.png", "pairs.png"} <= made


# --- the command line ------------------------------------------------------------------------------

MODULE = textwrap.dedent('''
    import _tiny

    def net():
        return _tiny.MLP()

    def heldout():
        return _tiny.batches(*_tiny.make_data(_tiny.HELDOUT_SIZE, 3))
''')


@pytest.fixture(scope="module")
def mod(tmp_path_factory):
    path = tmp_path_factory.mktemp("analyze_cli") / "anzoo.py"
    path.write_text(MODULE)
    return str(path)


def _run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _argv(kind, zoo, mod, out, *extra):
    z, base = zoo
    args = {"landscape": [base, z.paths[0], z.paths[1], "--steps", "5", "--span", "-0.5", "1.5"],
            "interpolate": [z.paths[0], base, "--alphas", "-0.5", "0", "1"],
            "pairs": [*z.paths[:3], "--base", base],
            "ensemble-vs-soup": list(z.paths[:3]),
            "count": list(z.paths[:3])}[kind]
    return ["analyze", kind, *args, "--model", f"{mod}:net", "--heldout", f"{mod}:heldout", "-o", str(out),
            "--no-progress", *extra]


@pytest.mark.parametrize("kind", ["landscape", "interpolate", "pairs", "ensemble-vs-soup", "count"])
def test_analyze_cli_writes_the_rows_and_the_figure(zoo, mod, tmp_path, capsys, kind):
    z, base = zoo
    out = tmp_path / "rows.jsonl"
    rc, stdout, err = _run(_argv(kind, zoo, mod, out), capsys)
    assert rc == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    name = kind.replace("-", "_")
    assert rows and all(r["analysis"] == name for r in rows)
    assert stdout.startswith(f"{name}: ") and "wrote " in err
    if analysis.plotting_available():
        png = tmp_path / "rows.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the rows are those of the Python API
    if kind == "landscape":
        api = analysis.landscape(base, z.paths[0], z.paths[1], z.model(), z.heldout, steps=5, progress=False)
        assert rows == api.rows
        corner = _row(api, x=1.0, y=0.0)
        assert (corner["accuracy"], corner["loss"]) == _plain(z, z.state_dicts[0])
    if kind == "interpolate":
        assert [r["alpha"] for r in rows] == [-0.5, 0.0, 1.0]


def test_analyze_cli_outputs_and_errors(zoo, mod, tmp_path, capsys):
    out = tmp_path / "l.jsonl"
    argv = _argv("landscape", zoo, mod, out, "--no-plot")
    assert _run(argv, capsys)[0] == 0
    assert out.exists() and not (tmp_path / "l.png").exists()
    rc, _, err = _run(argv, capsys)  # exists: refused before any work
    assert rc == 1 and err.startswith("fastsoup: error:") and "exists" in err
    assert _run(argv + ["--overwrite", "--png", str(tmp_path / "fig.png")], capsys)[0] == 0
    i = argv.index("--heldout")
    rc, _, err = _run(argv[:i] + argv[i + 2:] + ["--overwrite"], capsys)
    assert rc == 1 and "give --heldout" in err
    rc, _, err = _run(_argv("landscape", zoo, mod, tmp_path / "x.jsonl", "--steps", "1"), capsys)
    assert rc == 1 and "steps must be" in err and not (tmp_path / "x.jsonl").exists()


def test_analyze_cli_without_matplotlib_writes_the_rows(zoo, mod, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "p.jsonl"
    rc, _, err = _run(_argv("pairs", zoo, mod, out), capsys)
    assert rc == 0, err
    assert out.exists() and not (tmp_path / "p.png").exists()
    assert "fastsoup: note: no figure: it needs matplotlib: pip install matplotlib" in err
