"""`fastsoup demo` end to end, small (4 fine-tunes): outputs written, the paper's phenomenon visible."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn", reason="the demo's data ships inside scikit-learn (pip install 'fastsoup[demo]')")


@pytest.mark.slow
def test_demo_small(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from fastsoup import cli

    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--models", "5", "--seed", "0", "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    for label in ("heldout", "test", "shift", "uniform soup", "greedy soup", "greedy ensemble"):
        assert label in stdout
    assert (out / "greedy_soup.safetensors").exists() and (out / "greedy_soup.json").exists()
    assert (out / "soups.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "zoo").glob("ft-*.safetensors"))) == 5
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    individual = [r for r in rows if r["kind"] == "individual"]
    greedy = next(r for r in rows if r["kind"] == "greedy_soup")
    uniform = next(r for r in rows if r["kind"] == "uniform_soup")
    best = max(r["heldout"] for r in individual)
    assert greedy["heldout"] >= best  # Recipe 1 never ends below its best ingredient on held-out
    assert uniform["heldout"] < best  # the too-large learning rates spoil the uniform soup
    hp = json.loads((out / "zoo" / "hparams.json").read_text())
    assert sum(v["lr"] >= 3e-2 for v in hp.values()) == 2


@pytest.mark.slow
def test_demo_without_matplotlib_prints_and_writes_everything_but_the_figure(tmp_path, capsys, monkeypatch):
    import builtins

    from fastsoup import cli

    real = builtins.__import__

    def imp(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", imp)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--models", "3", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("greedy soup ") for line in lines) and any("greedy search:" in line for line in lines)
    assert lines[-1] == "figure skipped (matplotlib is not installed): pip install matplotlib"
    assert lines[-2].startswith("wrote ") and "soups.png" not in lines[-2]
    assert not (out / "soups.png").exists()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 + 6 and all({"heldout", "test", "shift"} <= set(r) for r in rows)
    assert (out / "greedy_soup.safetensors").exists()


def test_demo_rejects_too_few_models(tmp_path):
    from fastsoup.demo import run_demo

    with pytest.raises(ValueError, match="at least 3"):
        run_demo(str(tmp_path), models=2)
