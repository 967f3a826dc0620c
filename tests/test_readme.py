"""The README's Python examples run top to bottom as written.

Every ```python block of README.md is run in order, in one namespace, in a temporary folder holding
tiny checkpoints under the names the examples use: ``ft-lr1e-5/`` (a sharded folder),
``ft-lr3e-5/`` (a folder with one model.safetensors), ``ft-wd0.1/model.safetensors``,
``zero-shot.safetensors`` (the shared init), and timm ``train.py`` runs in
``output/train/run-a/`` and ``output/train/run-b/``. The names the README says stand for the
reader's own objects are given: ``models`` (fine-tuned modules), ``model`` (one more) and
``val_loader`` (held-out batches). A block whose first line is ``# not run by tests/test_readme.py``
(one that needs a GPU or real data) is skipped.
"""

from __future__ import annotations

import os
import re
import warnings

import pytest

torch = pytest.importorskip("torch")

import fastsoup  # noqa: E402

import _tiny  # noqa: E402
from _frameworks import timm_zoo  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SKIP = "# not run by tests/test_readme.py"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        out.append((text[:m.start()].count("\n") + 2, m.group(1)))
    return out


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    with open(README, encoding="utf-8") as f:
        blocks = python_blocks(f.read())
    assert len(blocks) >= 3
    (tmp_path / "zoo").mkdir()
    zoo = _tiny.build_zoo(tmp_path / "zoo")
    monkeypatch.chdir(tmp_path)
    a, b, c = zoo.state_dicts[:3]
    fastsoup.save(a, "ft-lr1e-5/", shard_size=1500)  # several shards and an index
    fastsoup.save(b, "ft-lr3e-5/model.safetensors")
    fastsoup.save(c, "ft-wd0.1/model.safetensors")
    fastsoup.save(zoo.init, "zero-shot.safetensors")
    assert len([n for n in os.listdir("ft-lr1e-5") if n.endswith(".safetensors")]) > 1
    timm_zoo(str(tmp_path), runs=2, names=["run-a", "run-b"])
    models = []
    for sd in (a, b, c):
        m = zoo.model()
        m.load_state_dict(sd)
        models.append(m)
    ns = {"__name__": "__readme__", "models": models, "model": zoo.model(), "val_loader": zoo.heldout}
    ran = 0
    for line, code in blocks:
        if code.startswith(SKIP):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fastsoup.StateDictChoiceWarning)  # the README says it warns
            exec(compile(code, f"README.md (block at line {line})", "exec"), ns)
        ran += 1
    assert ran >= 3
    # What the examples say they make.
    for out in ("soup", "soup-bf16", "running-soup"):
        assert os.path.exists(os.path.join(out, "model.safetensors.index.json")) or os.path.exists(
            os.path.join(out, "model.safetensors")), out
    for out in ("greedy.safetensors", "greedy.json", "timm-soup.safetensors", "timm-ema-soup.safetensors"):
        assert os.path.isfile(out), out
    assert ns["info"]["key"] == "state_dict" and ns["info"]["entries"]["args"] == "Namespace"
    assert fastsoup.open_checkpoint("soup-bf16/")["fc1.weight"].dtype == "bfloat16"
