"""similarity (cosines, angles, norms; task vectors) against float64 torch, inspect_checkpoint, and the
`fastsoup inspect` / `fastsoup similarity` commands."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import fastsoup  # noqa: E402
from fastsoup import cli  # noqa: E402
from fastsoup.diagnostics import CHUNK, Similarity, inspect_checkpoint, similarity  # noqa: E402

TIMEOUT = 300  # seconds for one subprocess: a hang fails the test instead of blocking CI
SHAPES = {"embed.weight": (64, 48), "block.weight": (96, 64), "block.bias": (96,), "head.weight": (10, 96)}


def _zoo(k=3, dtype=torch.float32, seed=0, shapes=SHAPES, spread=0.7):
    """K correlated checkpoints (a shared part plus noise), each with an integer tensor that differs."""
    g = torch.Generator().manual_seed(seed)
    common = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    out = []
    for i in range(k):
        sd = {n: (c + spread * torch.randn(c.shape, generator=g)).to(dtype) for n, c in common.items()}
        sd["num_batches_tracked"] = torch.tensor([1000 * (i + 1)])  # ignored by similarity
        out.append(sd)
    return out


def _save_all(folder, sds, prefix="ck"):
    paths = []
    for i, sd in enumerate(sds):
        p = os.path.join(folder, f"{prefix}{i}.safetensors")
        fastsoup.save(sd, p, overwrite=True)
        paths.append(p)
    return paths


def _flat(sd) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in sd.values() if t.is_floating_point()])


def _reference(sds, base=None):
    x = torch.stack([_flat(sd) for sd in sds])
    if base is not None:
        x = x - _flat(base)
    gram = x @ x.T
    norms = gram.diagonal().sqrt()
    cos = gram / (norms[:, None] * norms[None, :])
    return gram, norms, cos


def _check(s: Similarity, sds, base=None, cos_atol=1e-6):
    gram, norms, cos = _reference(sds, base)
    k = len(sds)
    assert len(s.gram) == k and all(len(row) == k for row in s.gram)
    for i in range(k):
        assert math.isclose(s.norms[i], float(norms[i]), rel_tol=1e-6), (i, s.norms[i], float(norms[i]))
        for j in range(k):
            scale = float(norms[i] * norms[j])
            assert math.isclose(s.gram[i][j], float(gram[i, j]), rel_tol=1e-6, abs_tol=1e-6 * scale)
            assert abs(s.cosine[i][j] - float(cos[i, j])) <= cos_atol, (i, j, s.cosine[i][j], float(cos[i, j]))
            assert s.gram[i][j] == s.gram[j][i]
            if i != j:
                ref_angle = math.degrees(math.acos(max(-1.0, min(1.0, float(cos[i, j])))))
                sin = math.sqrt(max(1e-12, 1 - float(cos[i, j]) ** 2))
                assert abs(s.angles[i][j] - ref_angle) <= math.degrees(cos_atol / sin) + 1e-9
        assert abs(s.cosine[i][i] - 1.0) < 1e-12 and s.angles[i][i] < 1e-4


def test_similarity_of_checkpoints(tmp_path):
    sds = _zoo(4)
    paths = _save_all(tmp_path, sds)
    s = similarity(paths)
    _check(s, sds)
    assert s.names == paths and s.base is None
    off = [s.cosine[i][j] for i in range(4) for j in range(4) if i != j]
    assert all(0.3 < c < 0.95 for c in off)  # correlated: a meaningful comparison, not all ~0 or ~1


def test_similarity_of_state_dicts_and_threads():
    sds = _zoo(3)
    s = similarity(sds, threads=1)
    _check(s, sds)
    assert s.names == ["<ingredient 0>", "<ingredient 1>", "<ingredient 2>"]
    assert similarity(sds, threads=2).gram == s.gram


def test_task_vectors_small_deltas(tmp_path):
    # Fine-tunes = base + 1e-3 relative deltas: the cosines of theta_k - base are where a naive
    # <a, b> - <a, base> - ... in float32 would cancel to noise.
    g = torch.Generator().manual_seed(1)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    direction = {n: torch.randn(t.shape, generator=g) for n, t in base.items()}
    sds = []
    for i in range(3):
        sd = {n: t + 1e-3 * t.abs().mean() * (0.8 * direction[n] + torch.randn(t.shape, generator=g))
              for n, t in base.items()}
        sds.append(sd)
    pb = _save_all(tmp_path, [base], "base")[0]
    paths = _save_all(tmp_path, sds)
    s = similarity(paths, base=pb)
    assert s.base == pb
    _check(s, sds, base, cos_atol=1e-4)
    off = [s.cosine[i][j] for i in range(3) for j in range(3) if i != j]
    assert all(0.2 < c < 0.6 for c in off)  # the shared direction shows (without base the cosines are ~1)
    plain = similarity(paths)
    assert all(plain.cosine[i][j] > 0.9999 for i in range(3) for j in range(3))


def test_task_vectors_fp16_ingredients_fp32_base(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    shared = {n: torch.randn(t.shape, generator=g) for n, t in base.items()}
    sds = [{n: (t + 0.02 * (shared[n] + torch.randn(t.shape, generator=g))).half() for n, t in base.items()}
           for _ in range(3)]
    pb = _save_all(tmp_path, [base], "base")[0]
    paths = _save_all(tmp_path, sds)
    s = similarity(paths, base=pb)
    _check(s, sds, base, cos_atol=1e-5)
    # in memory, mixed with a file, same answer
    s2 = similarity([sds[0], paths[1], sds[2]], base=base)
    assert s2.base == "<base>"
    _check(s2, sds, base, cos_atol=1e-5)


def test_similarity_chunks_large_tensors(tmp_path):
    # 1.5M elements: more than one CHUNK of the task-vector path; one ingredient in fp16 (the chunk
    # offsets depend on the element size).
    n = CHUNK + CHUNK // 2
    g = torch.Generator().manual_seed(3)
    base = {"big": torch.randn(n, generator=g), "small.bias": torch.randn(7, generator=g)}
    shared = {k: torch.randn(t.shape, generator=g) for k, t in base.items()}
    sds = []
    for i, dtype in enumerate([torch.float32, torch.float16]):
        sds.append({k: (t + 0.05 * (shared[k] + torch.randn(t.shape, generator=g))).to(dtype)
                    for k, t in base.items()})
    # A vector that differs only in the tail beyond the first chunk must show up.
    tail = {k: t.clone() for k, t in base.items()}
    tail["big"][CHUNK + 10:] += 0.05 * torch.randn(n - CHUNK - 10, generator=g)
    sds.append(tail)
    pb = _save_all(tmp_path, [base], "base")[0]
    paths = _save_all(tmp_path, sds)
    s = similarity(paths, base=pb)
    _check(s, sds, base, cos_atol=1e-5)
    assert s.norms[2] > 0
    _check(similarity(paths), sds)


def test_integer_tensors_are_ignored(tmp_path):
    sds = _zoo(2)
    floats_only = [{n: t for n, t in sd.items() if t.is_floating_point()} for sd in sds]
    a = similarity(_save_all(tmp_path, sds))
    b = similarity(_save_all(tmp_path, floats_only, "f"))
    assert a.gram == b.gram


def test_zero_task_vector_gives_nan(tmp_path):
    sds = _zoo(2)
    s = similarity([sds[0], sds[1]], base=sds[0])
    assert s.norms[0] == 0.0 and s.norms[1] > 0
    assert math.isnan(s.cosine[0][1]) and math.isnan(s.angles[0][1]) and math.isnan(s.cosine[0][0])
    assert s.cosine[1][1] == pytest.approx(1.0)


def test_similarity_errors(tmp_path):
    sds = _zoo(2)
    odd = dict(sds[1])
    odd["head.weight"] = torch.zeros(11, 96)
    with pytest.raises(fastsoup.CheckpointError, match="head.weight"):
        similarity(_save_all(tmp_path, [sds[0], odd]))
    with pytest.raises(fastsoup.CheckpointError, match="head.weight"):
        similarity(sds, base=odd)
    missing = dict(sds[1])
    del missing["block.bias"]
    with pytest.raises(fastsoup.CheckpointError, match="block.bias"):
        similarity([sds[0], missing])
    with pytest.raises(fastsoup.CheckpointError):
        similarity([str(tmp_path / "nope.safetensors")])
    with pytest.raises(ValueError, match="no ingredients"):
        similarity([])


def test_similarity_of_files_does_not_import_torch(tmp_path):
    sds = _zoo(3)
    paths = _save_all(tmp_path, sds)
    base = _save_all(tmp_path, [_zoo(1, seed=9)[0]], "base")[0]
    expected = similarity(paths).gram
    code = (
        "import json, sys, fastsoup\n"
        f"s = fastsoup.similarity({paths!r})\n"
        f"t = fastsoup.similarity({paths!r}, base={base!r})\n"
        "info = fastsoup.inspect_checkpoint(t.names[0])\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'gram': s.gram, 'k': len(t.cosine)}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["torch"] is False
    assert out["gram"] == expected and out["k"] == 3


def test_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    sds = _zoo(3)
    paths = _save_all(tmp_path, sds)
    s = similarity(paths, base=sds[0] | {"num_batches_tracked": torch.tensor([0])})
    text = s.table()
    lines = text.splitlines()
    assert lines[1].split()[0] == "0" and len(lines[1].split()) == 4
    assert float(lines[2].split()[2]) == pytest.approx(s.cosine[1][1], abs=1e-4)
    assert float(lines[3].split()[2]) == pytest.approx(s.cosine[2][1], abs=1e-4)
    assert all(p in text for p in paths)
    angles = s.table("angles").splitlines()
    assert float(angles[3].split()[2]) == pytest.approx(s.angles[2][1], abs=0.01)
    png = tmp_path / "sim.png"
    assert s.plot(str(png), "angles") == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------
# inspect_checkpoint


def _mixed_state_dict():
    g = torch.Generator().manual_seed(4)
    return {
        "a.weight": torch.randn(300, 200, generator=g),
        "a.bias": torch.randn(300, generator=g).half(),
        "b.weight": torch.randn(100, 100, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(100, 100, generator=g),
        "steps": torch.arange(5),
        "empty": torch.zeros(0, 3),
    }


def _expected_summary(sd):
    dtypes: dict = {}
    for t in sd.values():
        name = str(t.dtype).replace("torch.", "")
        d = dtypes.setdefault(name, {"tensors": 0, "params": 0, "bytes": 0})
        d["tensors"] += 1
        d["params"] += t.numel()
        d["bytes"] += t.numel() * t.element_size()
    return dtypes


def test_inspect_single_file(tmp_path):
    sd = _mixed_state_dict()
    path = tmp_path / "one.safetensors"
    fastsoup.save(sd, path, metadata={"format": "pt", "run": "lr3e-5"})
    info = inspect_checkpoint(str(path))
    assert info["source"] == str(path)
    assert info["tensors"] == len(sd) == 6
    assert info["params"] == sum(t.numel() for t in sd.values())
    assert info["bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert info["dtypes"] == _expected_summary(sd)
    assert info["shards"] == [{"file": str(path), "bytes": os.path.getsize(path), "tensors": 6}]
    assert info["metadata"] == {"format": "pt", "run": "lr3e-5"}
    json.dumps(info)  # serializable as is


def test_inspect_sharded_folder(tmp_path):
    sd = _mixed_state_dict()
    folder = tmp_path / "sharded"
    fastsoup.save(sd, folder, shard_size=50_000)
    info = inspect_checkpoint(folder)
    assert info["tensors"] == 6
    assert info["params"] == sum(t.numel() for t in sd.values())
    assert info["bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert info["dtypes"] == _expected_summary(sd)
    shards = info["shards"]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert len(shards) == len(files) >= 3
    assert sorted(os.path.basename(s["file"]) for s in shards) == files
    for s in shards:
        assert s["bytes"] == os.path.getsize(s["file"]) and s["tensors"] >= 1
    assert sum(s["tensors"] for s in shards) == 6
    assert info["metadata"] == {"format": "pt"}
    # the index file names the same checkpoint
    index = inspect_checkpoint(folder / "model.safetensors.index.json")
    assert {k: index[k] for k in ("tensors", "params", "bytes", "dtypes", "shards")} == \
        {k: info[k] for k in ("tensors", "params", "bytes", "dtypes", "shards")}


def test_inspect_in_memory_and_missing(tmp_path):
    sd = _mixed_state_dict()
    info = inspect_checkpoint(sd)
    assert info["tensors"] == 6 and info["shards"] == [] and info["dtypes"] == _expected_summary(sd)
    with pytest.raises(fastsoup.CheckpointError):
        inspect_checkpoint(str(tmp_path / "missing.safetensors"))


# ---------------------------------------------------------------------------------------------------
# CLI


def _run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_inspect(tmp_path, capsys):
    sd = _mixed_state_dict()
    path = tmp_path / "one.safetensors"
    fastsoup.save(sd, path, metadata={"format": "pt", "run": "x"})
    rc, out, err = _run(["inspect", path], capsys)
    assert rc == 0, err
    total = sum(t.numel() for t in sd.values())
    assert out.splitlines()[0].startswith(f"{path}: 6 tensors, {total:,} parameters")
    for dt in ("float32", "float16", "bfloat16", "int64"):
        assert any(line.split()[0] == dt for line in out.splitlines()[1:5])
    assert "1 file(s)" in out and '"run": "x"' in out
    rc, out, err = _run(["inspect", path, "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out) == json.loads(json.dumps(inspect_checkpoint(str(path))))

    folder = tmp_path / "sharded"
    fastsoup.save(sd, folder, shard_size=50_000)
    rc, out, err = _run(["inspect", folder], capsys)
    assert rc == 0, err
    n = len(inspect_checkpoint(folder)["shards"])
    assert f"{n} file(s)" in out and out.count("model-0000") == n


def test_cli_similarity(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    sds = _zoo(3)
    paths = _save_all(tmp_path, sds)
    base = _save_all(tmp_path, [_zoo(1, seed=5)[0]], "base")[0]

    rc, out, err = _run(["similarity", *paths], capsys)
    assert rc == 0, err
    assert out.startswith("cosine similarity of checkpoints:")
    s = similarity(paths)
    assert s.table("cosine") in out

    rc, out, err = _run(["similarity", *paths, "--base", base, "--angles", "--threads", "1"], capsys)
    assert rc == 0, err
    assert out.startswith(f"angles (degrees) of task vectors (minus {base}):")
    assert similarity(paths, base=base).table("angles") in out

    png = tmp_path / "heat.png"
    rc, out, err = _run(["similarity", *paths, "--plot", png], capsys)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert str(png) in err


@pytest.mark.parametrize("case", ["missing", "shapes", "base-shapes", "inspect-missing", "not-a-checkpoint"])
def test_cli_diagnostics_errors(tmp_path, capsys, case):
    sds = _zoo(2)
    paths = _save_all(tmp_path, sds)
    odd = dict(sds[1])
    odd["head.weight"] = torch.zeros(11, 96)
    podd = _save_all(tmp_path, [odd], "odd")[0]
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    argv = {
        "missing": ["similarity", paths[0], tmp_path / "nope.safetensors"],
        "shapes": ["similarity", paths[0], podd],
        "base-shapes": ["similarity", *paths, "--base", podd],
        "inspect-missing": ["inspect", tmp_path / "nope.safetensors"],
        "not-a-checkpoint": ["inspect", junk],
    }[case]
    rc, out, err = _run(argv, capsys)
    assert rc == 1
    assert err.startswith("fastsoup: error:") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
