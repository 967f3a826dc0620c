"""The merge contenders as the drivers run them (bench_merge, the suite of benchmarks.run,
compare_builds, the pytest-benchmark suites): the read bound, a contender of ``_contenders`` in a
fresh process, the ``fastsoup average`` command and mergekit as whole processes, and the comparison
of two outputs after timing. Every run first warms the page cache (or drops it: ``cold``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from .harness import fastsoup_cli, input_files, prepare, remove, run_module, run_peak


def run_bound(paths, out, out_size, cold, parallel=False):
    """Reads every input file (`cat` to /dev/null; one after another, or all at once when parallel)
    and writes a buffer of the output's size to a new file."""
    buf = bytearray(b"\x01") * out_size  # real pages (not the shared zero page), touched before the clock
    remove(out)
    prepare(paths, cold)
    t0 = time.perf_counter()
    if parallel:
        procs = [subprocess.Popen(["cat", f], stdout=subprocess.DEVNULL) for f in input_files(paths)]
        for p in procs:
            p.wait()
    else:
        subprocess.run(["cat", *input_files(paths)], stdout=subprocess.DEVNULL, check=True)
    t1 = time.perf_counter()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    mv = memoryview(buf)
    for i in range(0, out_size, 16 << 20):
        os.write(fd, mv[i : i + (16 << 20)])
    os.close(fd)
    t2 = time.perf_counter()
    remove(out)
    return {"seconds": t2 - t0, "read_seconds": t1 - t0, "write_seconds": t2 - t1}


def run_contender(name, paths, out, cold, tree=None):
    """One contender of ``benchmarks._contenders`` in a fresh process (its fastsoup from ``tree``
    when given): its figures, and ``process_seconds`` (the whole process, seen from here)."""
    remove(out)
    prepare(paths, cold)
    t0 = time.perf_counter()
    res = run_module("benchmarks._contenders", [name, out, *paths], tree=tree)
    res["process_seconds"] = time.perf_counter() - t0
    return res


def run_cli(paths, out, cold=False):
    """``fastsoup average IN... -o OUT`` as a whole process: its wall time and peak RSS."""
    remove(out)
    prepare(paths, cold)
    return run_peak([*fastsoup_cli(), "average", *paths, "-o", out, "--no-progress"])


def find_mergekit(explicit):
    """mergekit's ``mergekit-pytorch``: ``explicit``, else on PATH, else /tmp/mkvenv/bin; None if none."""
    for c in (explicit, shutil.which("mergekit-pytorch"), "/tmp/mkvenv/bin/mergekit-pytorch"):
        if c and os.path.exists(c):
            return c
    return None


def mergekit_version(exe):
    py = os.path.join(os.path.dirname(exe), "python")
    try:
        r = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                           capture_output=True, text=True, timeout=120)
        return r.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def mergekit_config(path, inputs):
    """A ``linear`` mergekit config over ``inputs`` (weight 1 each), written to ``path``."""
    with open(path, "w") as f:
        f.write("merge_method: linear\nmodels:\n")
        for p in inputs:
            f.write(f"  - model: {p}\n    parameters:\n      weight: 1.0\n")
    return path


def run_mergekit(exe, config, inputs, out):
    remove(out)
    prepare(inputs, False)
    return run_peak([exe, config, out, "--quiet"])


def max_ulp_diff(a_path, b_path):
    """The largest distance in ulps between two outputs' float tensors (of 2 or 4 bytes), over all
    tensors (``fastsoup.open_checkpoint`` of each: a file or a folder)."""
    import torch

    import fastsoup

    ca, cb = fastsoup.open_checkpoint(a_path), fastsoup.open_checkpoint(b_path)
    worst = 0
    for name in ca:
        x, y = ca.tensor(name), cb.tensor(name)
        if x.is_floating_point():
            xi = x.view(torch.int16).int() if x.element_size() == 2 else x.view(torch.int32).long()
            yi = y.view(torch.int16).int() if y.element_size() == 2 else y.view(torch.int32).long()
            worst = max(worst, int((xi - yi).abs().max().item()) if x.numel() else 0)
    return worst
