"""The native sparse merge kernel (``_core.sparse_merge``) against the linear kernel (``_core.weighted_sum``)
on the same in-memory arrays: K fp16 task models and a base of n elements each, one output reused.

    python benchmarks/bench_sparse.py [--sizes 1M,16M,64M] [--k 8] [--runs 5] [--threads 0]
                                      [--methods linear,task_arithmetic,ties,dare_ties,breadcrumbs]
                                      [--isa avx512|avx2|scalar] [--trees before=../old after=.]

Each round times every method once per size (medians over the rounds; the ratio column is the
method's median over the linear kernel's). ``linear`` is fastsoup's linear merge of the K models
(weighted_sum, weights 1, divided by K: ``average``); the sparse methods use density 0.5 (breadcrumbs:
gamma 0.01), TIES normalized, DARE seeded. With ``--trees``, each round runs one fresh process per
tree (the order flips every round, PYTHONPATH pointing at the tree; build each tree in place first),
the table gives every tree side by side, and the outputs of the trees are compared by hash (the same
bits). Run it as a script (not ``-m``), so that the tree's fastsoup is the one imported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs"]
KW = {
    "task_arithmetic": {},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5, "seed": 1, "name": "model.layers.0.mlp.up_proj.weight"},
    "breadcrumbs": {"density": 0.5, "gamma": 0.01},
    # with mergekit's L1-norm rescale (its default for DARE configs): --methods ties_l1 dare_ties_l1
    "ties_l1": {"density": 0.5, "rescale": "l1"},
    "dare_ties_l1": {"density": 0.5, "seed": 1, "name": "model.layers.0.mlp.up_proj.weight", "rescale": "l1"},
}


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(float(s.rstrip("KMG")) * mult)


def data(n: int, k: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed + n)
    base = torch.randn(n, generator=g).half()
    models = []
    for j in range(k):
        models.append((base.float() + torch.randn(n, generator=g) * (0.01 * (j + 1))).half())
    return base, models


def one_round(sizes, k, methods, threads, isa, rounds_in_process=1):
    """{size: {method: [seconds...]}}, {size: {method: output hash}} for ``rounds_in_process`` rounds."""
    import torch

    from fastsoup import _core
    from fastsoup.methods.native import sparse_merge

    if isa:
        _core.set_isa(isa)
    times: dict = {}
    hashes: dict = {}
    for n in sizes:
        base, models = data(n, k)
        out = torch.empty(n, dtype=torch.float16)
        addrs = [m.data_ptr() for m in models]
        code = 0  # float16

        def run(method):
            if method == "linear":
                _core.weighted_sum(addrs, [code] * k, [1.0] * k, n, out.data_ptr(), code, threads=threads,
                                   divisor=float(k))
            else:
                sparse_merge(method.removesuffix("_l1"), base, models, out, threads=threads, **KW[method])

        hashes[n] = {}
        for method in methods:  # warm-up (page faults of the output, thread pool start), and the output's hash
            run(method)
            hashes[n][method] = hashlib.blake2b(out.numpy().tobytes(), digest_size=16).hexdigest()
        times[n] = {m: [] for m in methods}
        for _ in range(rounds_in_process):
            for method in methods:
                t0 = time.perf_counter()
                run(method)
                times[n][method].append(time.perf_counter() - t0)
        del base, models, out
    return times, hashes


def fmt_size(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else str(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,16M,64M")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--isa", default=None)
    ap.add_argument("--trees", nargs="*", default=None, help="NAME=DIR ... (one process per tree and round)")
    ap.add_argument("--json", default=None, help="write the raw times here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    if "linear" not in methods:
        methods.insert(0, "linear")

    if args.worker:
        import fastsoup
        from fastsoup import _core

        times, hashes = one_round(sizes, args.k, methods, args.threads, args.isa)
        print(json.dumps({"file": fastsoup.__file__, "isa": _core.isa(), "times": times, "hashes": hashes}))
        return

    trees = [t.split("=", 1) for t in (args.trees or [])]
    # {tree: {size: {method: [s]}}}
    raw: dict = {}
    hashes: dict = {}
    info: dict = {}
    if not trees:
        import fastsoup
        from fastsoup import _core

        t, h = one_round(sizes, args.k, methods, args.threads, args.isa, rounds_in_process=args.runs)
        raw["this"] = {n: t[n] for n in sizes}
        hashes["this"] = h
        info["this"] = f"{fastsoup.__file__} isa {_core.isa()}"
    else:
        for name, _ in trees:
            raw[name] = {n: {m: [] for m in methods} for n in sizes}
        for r in range(args.runs):
            order = trees if r % 2 == 0 else trees[::-1]
            for name, tree in order:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--sizes", args.sizes, "--k", str(args.k),
                       "--threads", str(args.threads), "--methods", ",".join(methods)]
                if args.isa:
                    cmd += ["--isa", args.isa]
                env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
                res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
                info[name] = f"{res['file']} isa {res['isa']}"
                for n in sizes:
                    for m in methods:
                        raw[name][n][m] += res["times"][str(n)][m]
                hashes[name] = {n: res["hashes"][str(n)] for n in sizes}
                print(f"round {r + 1}/{args.runs} {name}: " + ", ".join(
                    f"{fmt_size(n)} {m} {res['times'][str(n)][m][0]:.3f}" for n in sizes for m in methods if m != "linear"),
                    file=sys.stderr, flush=True)

    names = list(raw)
    print(f"# K = {args.k} fp16 inputs + fp16 base -> fp16 out, threads {args.threads or os.cpu_count()}, "
          f"{args.runs} runs, medians (min)")
    for name in names:
        print(f"# {name}: {info[name]}")
    head = "| n | method | " + " | ".join(f"{nm} s | {nm} / linear" for nm in names)
    if len(names) == 2:
        head += f" | {names[1]} / {names[0]}"
    print(head + " |")
    print("|" + "---|" * (2 + 2 * len(names) + (1 if len(names) == 2 else 0)))
    for n in sizes:
        for m in methods:
            cells = []
            meds = []
            for nm in names:
                med = statistics.median(raw[nm][n][m])
                lin = statistics.median(raw[nm][n]["linear"])
                meds.append(med)
                cells.append(f"{med:.4f} ({min(raw[nm][n][m]):.4f}) | {med / lin:.2f}")
            row = f"| {fmt_size(n)} | {m} | " + " | ".join(cells)
            if len(names) == 2:
                row += f" | {meds[1] / meds[0]:.3f}"
            print(row + " |")
    if len(names) > 1:
        same = all(hashes[nm][n] == hashes[names[0]][n] for nm in names for n in sizes)
        print(f"# outputs identical across trees: {same}")
        if not same:
            for n in sizes:
                for m in methods:
                    hs = {nm: hashes[nm][n][m] for nm in names}
                    if len(set(hs.values())) > 1:
                        print(f"#   DIFFER: {fmt_size(n)} {m}: {hs}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "info": info, "times": {nm: {str(n): raw[nm][n] for n in sizes} for nm in names},
                       "hashes": {nm: {str(n): hashes[nm][n] for n in sizes} for nm in names}}, f, indent=1)


if __name__ == "__main__":
    main()
