"""One merge contender per process (so each has its own peak RSS), driven by benchmarks.merge
(for bench_merge, the suite of benchmarks.run, compare_builds).

    python -m benchmarks._contenders NAME OUT IN [IN ...]

Prints one JSON line: {"seconds": time of the timed region, "cpu_seconds": this process's CPU time in
it (all threads), "maxrss_mb": peak RSS of the process, "pid"}, and for the fastsoup contenders
"fastsoup" (the package's file: which tree it came from) and "isa". Only fastsoup's public API.
"""

from __future__ import annotations

import json
import os
import sys
import time

from .harness import native_info, peak_rss_mb


def load_safetensors(path):
    """A whole state dict from a .safetensors file or a sharded folder (every shard, in order)."""
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        return load_file(path)
    sd = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(path, f)))
    return sd


def naive_average(load, paths, out):
    # The recipe people write: load each state dict, sum in float32, divide, cast, save.
    from safetensors.torch import save_file

    acc, dtypes = None, None
    for p in paths:
        sd = load(p)
        if acc is None:
            acc = {k: v.float() for k, v in sd.items()}
            dtypes = {k: v.dtype for k, v in sd.items()}
        else:
            for k, v in sd.items():
                acc[k] += v.float()
        del sd
    soup = {k: (v / len(paths)).to(dtypes[k]) for k, v in acc.items()}
    save_file(soup, out, metadata={"format": "pt"})


def naive_safetensors(paths, out):
    naive_average(load_safetensors, paths, out)


def naive_torch_load(paths, out, mmap=False):
    import torch

    naive_average(lambda p: torch.load(p, map_location="cpu", weights_only=True, mmap=mmap), paths, out)


def fastsoup_api(paths, out):
    import fastsoup

    fastsoup.average(paths, out=out, progress=False)


def fastsoup_cuda(paths, out):
    import fastsoup

    fastsoup.average(paths, out=out, device="cuda", progress=False)


def import_only(paths, out):
    import fastsoup  # noqa: F401


CONTENDERS = {
    "naive_safetensors": naive_safetensors,
    "naive_safetensors_1t": naive_safetensors,  # the same with torch.set_num_threads(1)
    "naive_torch_load": naive_torch_load,
    "naive_torch_load_mmap": lambda p, o: naive_torch_load(p, o, mmap=True),
    "fastsoup_api": fastsoup_api,
    "fastsoup_cuda": fastsoup_cuda,
    "import_fastsoup": import_only,
}


def main() -> None:
    name, out, *paths = sys.argv[1:]
    fn = CONTENDERS[name]
    # Imports happen before the clock (the CLI contender of bench_merge times a whole process).
    if name.startswith("naive"):
        import torch

        if name.endswith("_1t"):
            torch.set_num_threads(1)
    elif name in ("fastsoup_api", "fastsoup_cuda"):
        import fastsoup  # noqa: F401

        if not all(p.endswith(".safetensors") or os.path.isdir(p) for p in paths):
            import torch  # noqa: F401  (fastsoup reads torch files with torch.load: imported before the clock too)
    t0, c0 = time.perf_counter(), time.process_time()
    fn(paths, out)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    res = {"seconds": seconds, "cpu_seconds": cpu, "maxrss_mb": peak_rss_mb(), "pid": os.getpid()}
    fs = sys.modules.get("fastsoup")
    if fs is not None:
        res.update(fastsoup=fs.__file__, isa=native_info(fs).get("isa"))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
