"""The merge comparisons of benchmarks/run.py as pytest-benchmark suites (not unit tests: `pytest tests`
does not collect them).

    pytest benchmarks/ --benchmark-only [-q]

Small generated checkpoints (K = 4 ViT-S/16-like, 44 MB each: fp16 as sharded safetensors and torch
.bin, bf16 as sharded safetensors) in a temporary folder; each group compares fastsoup against the
naive recipes in the same session, `benchmark.pedantic` with 5 rounds after one warm-up round. The
naive safetensors recipe also runs under torch.set_num_threads(1), as in benchmarks/run.py. These
run in this process (the page cache stays hot: the files are small and just read);
benchmarks/run.py has the fresh-process, peak-RSS and large-model figures.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytest_benchmark")

import fastsoup  # noqa: E402

from ._contenders import load_safetensors, naive_average  # noqa: E402
from .checkpoints import make_zoo  # noqa: E402
from .harness import remove  # noqa: E402
from .merge import max_ulp_diff  # noqa: E402

K = 4
CONFIG = "vit-s16"
ROUNDS = 5
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("fastsoup-bench-zoo")
    out = {}
    for tag, dt in DTYPES.items():
        out[(tag, "sharded")] = make_zoo(str(root / f"{tag}-sharded"), CONFIG, K, dt, "sharded", shard_size="16MB")
    out[("fp16", "bin")] = make_zoo(str(root / "fp16-bin"), CONFIG, K, DTYPES["fp16"], "bin")
    return out


def _bench(benchmark, fn, out):
    def setup():
        remove(out)

    benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def one_thread(fn):
    """fn under torch.set_num_threads(1) (torch's default threads wait for one another at every op when
    another process keeps a CPU busy; see benchmarks/run.py)."""
    def run():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(n)
    return run


def _naive_torch_load(mmap):
    return lambda p: torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)


# -- files in, file out: fastsoup against the naive recipes --------------------------------------------


FILE_CASES = [("fp16", c) for c in ("fastsoup", "fastsoup_bin", "naive_safetensors", "naive_safetensors_1thread",
                                     "naive_torch_load", "naive_torch_load_mmap")]
FILE_CASES += [("bf16", c) for c in ("fastsoup", "naive_safetensors", "naive_safetensors_1thread")]


@pytest.mark.parametrize("tag,contender", FILE_CASES)
def test_merge_files(benchmark, zoo, tmp_path, tag, contender):
    benchmark.group = f"merge files: {K} x {CONFIG} {tag}"
    benchmark.extra_info["input_bytes"] = sum(
        os.path.getsize(os.path.join(d, f)) for d in zoo[(tag, "sharded")] for f in os.listdir(d))
    sharded, bins = zoo[(tag, "sharded")], zoo.get((tag, "bin"))
    out = str(tmp_path / "soup.safetensors")
    fns = {
        "fastsoup": lambda: fastsoup.average(sharded, out=out, progress=False),
        "fastsoup_bin": lambda: fastsoup.average(bins, out=out, progress=False),
        "naive_safetensors": lambda: naive_average(load_safetensors, sharded, out),
        "naive_safetensors_1thread": one_thread(lambda: naive_average(load_safetensors, sharded, out)),
        "naive_torch_load": lambda: naive_average(_naive_torch_load(False), bins, out),
        "naive_torch_load_mmap": lambda: naive_average(_naive_torch_load(True), bins, out),
    }
    _bench(benchmark, fns[contender], out)
    # The soup of the last round against fastsoup's (correctness, outside the timed rounds).
    ref = str(tmp_path / "ref.safetensors")
    fastsoup.average(sharded, out=ref, progress=False)
    assert max_ulp_diff(ref, out) == 0


# -- state dicts in memory: fastsoup.average(list) against the dict comprehension -------------------


@pytest.mark.parametrize("contender", ["fastsoup", "naive_dict_comprehension"])
def test_merge_in_memory(benchmark, zoo, contender):
    benchmark.group = f"merge state dicts in memory: {K} x {CONFIG} fp16"
    sds = [load_safetensors(p) for p in zoo[("fp16", "sharded")]]
    n = len(sds)

    def naive():
        return {k: (sum(sd[k].float() for sd in sds) / n).to(sds[0][k].dtype) for k in sds[0]}

    def fast():
        return fastsoup.average(sds, progress=False)

    fn = fast if contender == "fastsoup" else naive
    result = benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    ref = naive() if contender == "fastsoup" else fast()
    for k, v in result.items():
        assert torch.equal(v, ref[k]), k
