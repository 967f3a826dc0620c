"""How far fastsoup.average is from the exact weighted mean rounded once (issue 19, item 8).

    python -m benchmarks.bench_precision [--impl TREE] [--n 16384] [--json FILE]

For K = 2..17, input dtype = output dtype float16, bfloat16, float32, float64, uniform weights and
random weights (uniform in [0.01, 1)), and five kinds of data (below), every element of
``fastsoup.average(state_dicts, weights)`` is compared with the exact mean
``sum_k w_k x_k / sum_k w_k``, computed in integer/rational arithmetic and rounded once to the
output dtype (nearest, ties to even: ``fastsoup/_reference.py``, ``exact_weighted_mean``). The
distance is counted in representable values of the output dtype (``ulp_distance``), so it is a
whole number: "off > 0" (the same as ">= 1") means not the correctly rounded mean, "> 1" means not
even one of its neighbours. Reported per dtype, weights and data kind: the largest distance and
the fraction of elements off by > 0 and by > 1 ulp, over all K.

Data kinds (n elements, every input its own draw unless said):
  independent  normal values (so the mean is near zero, against sum |x|, now and then)
  fine-tunes   a shared base N(0, 0.02) plus N(0, 0.002) per input (what soups average)
  spread       magnitudes spread over 16 binades, random signs
  cancel-2^22  the last input undoes the others' weighted sum up to (1..2) * 2^-6: the mean is small
               against sum |w x| (cancellation sum |w x| / |sum w x| up to about 2^22)
  cancel-2^40  the same up to (1..2) * 2^-24 (cancellation up to about 2^40)
Special cases: K identical inputs (the mean is the input), an exact-zero mean (uniform weights;
small integers times a power of two), exact ties (K = 3: means that are midpoints of the output
dtype), and the values of the issue (the float64 mean of [1/3, 1/3] and of [123456789.12] * 2).

--impl TREE measures the fastsoup package of another source tree (e.g. a throwaway build of the base
commit); the oracle is always this tree's, loaded from its file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
import zlib
from fractions import Fraction

from .harness import ROOT, machine, native_info, write_json

ORACLE = os.path.join(ROOT, "fastsoup", "_reference.py")
KS = list(range(2, 18))
KINDS = ["independent", "fine-tunes", "spread", "cancel-2^22", "cancel-2^40"]


def load_oracle():
    """This tree's plain-torch oracle (``exact_weighted_mean``, ``ulp_distance``), loaded from its file
    (not imported from the fastsoup being measured, which may be another tree's)."""
    if not os.path.exists(ORACLE):
        raise SystemExit(f"bench_precision: the oracle {ORACLE} is missing from this tree")
    spec = importlib.util.spec_from_file_location("fastsoup_exact_oracle", ORACLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def weights_for(kind, k, g, torch):
    if kind == "uniform":
        return None
    return [0.01 + 0.99 * float(u) for u in torch.rand(k, generator=g, dtype=torch.float64)]


def data(kind, k, n, dtype, ws, g, torch):
    w = torch.tensor(ws if ws is not None else [1.0] * k, dtype=torch.float64)
    if kind == "independent":
        x = torch.randn(k, n, generator=g, dtype=torch.float64)
    elif kind == "fine-tunes":
        x = torch.randn(n, generator=g, dtype=torch.float64) * 0.02 + 0.002 * torch.randn(k, n, generator=g, dtype=torch.float64)
    elif kind == "spread":
        sign = torch.where(torch.rand(k, n, generator=g) < 0.5, -1.0, 1.0).double()
        x = sign * torch.exp2(-16 * torch.rand(k, n, generator=g, dtype=torch.float64)) * (1 + torch.rand(k, n, generator=g, dtype=torch.float64))
    else:
        x = 8 * torch.randn(k, n, generator=g, dtype=torch.float64)
        x = x.to(dtype).double()
        nudge = (1 + torch.rand(n, generator=g, dtype=torch.float64)) * 2.0 ** (-6 if kind == "cancel-2^22" else -24)
        x[-1] = -(w[:-1, None] * x[:-1]).sum(0) / w[-1] + nudge
    return [row.to(dtype) for row in x]


def distances(fastsoup, oracle, xs, ws, dtype):
    got = fastsoup.average([{"t": x} for x in xs], ws)["t"]
    want = oracle.exact_weighted_mean(xs, ws, dtype)
    return oracle.ulp_distance(got, want)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", help="source tree whose fastsoup to measure (default: the one that imports)")
    ap.add_argument("--n", type=int, default=16384, help="elements per case")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.impl:
        sys.path.insert(0, os.path.abspath(args.impl))

    import torch

    import fastsoup

    if args.impl and not os.path.realpath(fastsoup.__file__).startswith(os.path.realpath(args.impl) + os.sep):
        raise SystemExit(f"bench_precision: --impl {args.impl}, but fastsoup was imported from {fastsoup.__file__}")
    oracle = load_oracle()
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
    t0 = time.time()
    print(f"# fastsoup from {os.path.dirname(fastsoup.__file__)} (isa {native_info(fastsoup)['isa']}); K = {KS[0]}..{KS[-1]}, "
          f"n = {args.n} per case; {platform.machine()}, torch {torch.__version__}", flush=True)
    results = {"fastsoup": os.path.dirname(fastsoup.__file__), "n": args.n, "machine": machine(), "cases": []}
    print()
    print("| dtype | weights | data | max ulp | off > 0 (≥ 1) | off > 1 | worst K |")
    print("|---|---|---|---:|---:|---:|---:|")
    for dname, dt in dtypes.items():
        for wkind in ("uniform", "random"):
            for kind in KINDS:
                worst, worst_k, over0, over1, total = 0, None, 0, 0, 0
                per_k = {}
                for k in KS:
                    g = torch.Generator().manual_seed(zlib.crc32(f"{dname} {wkind} {kind} {k}".encode()))
                    ws = weights_for(wkind, k, g, torch)
                    xs = data(kind, k, args.n, dt, ws, g, torch)
                    d = distances(fastsoup, oracle, xs, ws, dt)
                    m = int(d.max())
                    per_k[k] = {"max": m, "over0": int((d > 0).sum()), "over1": int((d > 1).sum())}
                    if m > worst:
                        worst, worst_k = m, k
                    over0 += per_k[k]["over0"]
                    over1 += per_k[k]["over1"]
                    total += d.numel()
                results["cases"].append({"dtype": dname, "weights": wkind, "data": kind, "max_ulp": worst, "worst_k": worst_k,
                                         "fraction_over0": over0 / total, "fraction_over1": over1 / total, "per_k": per_k})
                print(f"| {dname} | {wkind} | {kind} | {worst} | {100 * over0 / total:.3f} % | {100 * over1 / total:.3f} % | "
                      f"{worst_k if worst_k else '–'} |", flush=True)

    print()
    print("Special cases (uniform weights, K = 2..17, every dtype):")
    special = {}
    g = torch.Generator().manual_seed(7)
    for dname, dt in dtypes.items():
        x = (torch.randn(args.n, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-20, 20, (args.n,), generator=g))).to(dt)
        x[:2] = torch.tensor([1 / 3, 123456789.12], dtype=torch.float64).to(dt)
        changed = worst = 0
        for k in KS:
            got = fastsoup.average([{"t": x.clone()} for _ in range(k)])["t"]
            changed += int((got != x).sum())
            worst = max(worst, int(oracle.ulp_distance(got, x).max()))
        zero_off, zero_max = 0, 0.0
        for k in KS:
            gz = torch.Generator().manual_seed(k)
            scale = torch.exp2(torch.randint(-8, 9, (args.n,), generator=gz).double())
            ints = torch.randint(-7, 8, (k - 1, args.n), generator=gz).double() * scale
            xs = [t.to(dt) for t in [*ints, -ints.sum(0)]]
            got = fastsoup.average([{"t": t} for t in xs])["t"]
            zero_off += int((got != 0).sum())
            zero_max = max(zero_max, float(got.double().abs().max()))
        special[dname] = {"identical_changed_fraction": changed / (len(KS) * args.n), "identical_max_ulp": worst,
                          "zero_mean_nonzero_fraction": zero_off / (len(KS) * args.n), "zero_mean_max_abs": zero_max}
        print(f"- {dname}: identical inputs: {100 * changed / (len(KS) * args.n):.3f} % of elements changed, max {worst} ulp; "
              f"exact-zero mean: {100 * zero_off / (len(KS) * args.n):.3f} % nonzero, largest |result| {zero_max:.3g}")
    for dname in ("fp16", "bf16"):
        dt = dtypes[dname]
        gt = torch.Generator().manual_seed(3)
        xs = [torch.randn(8 * args.n, generator=gt).to(dt) for _ in range(3)]
        s = (xs[0].double() + xs[1].double() + xs[2].double()).numpy()  # exact
        m = s / 3
        exact = torch.tensor([Fraction(float(a)) == 3 * Fraction(float(b)) for a, b in zip(s, m)])
        ties = exact & torch.from_numpy(oracle._round_double(m, dt)[1])  # the mean is a midpoint of dt
        d = distances(fastsoup, oracle, xs, None, dt)
        special[dname]["k3_ties"] = int(ties.sum())
        special[dname]["k3_ties_wrong"] = int((d[ties] > 0).sum())
        special[dname]["k3_fraction_off"] = float((d > 0).double().mean())
        print(f"- {dname}, K = 3, {8 * args.n} random triples: {int(ties.sum())} exact ties "
              f"({100 * float(ties.double().mean()):.2f} %), {int((d[ties] > 0).sum())} of them rounded wrong; "
              f"{100 * float((d > 0).double().mean()):.2f} % of all elements off by 1 ulp or more")
    for value in (1 / 3, 123456789.12):
        x = torch.tensor([value], dtype=torch.float64)
        got = fastsoup.average([{"t": x}, {"t": x.clone()}])["t"].item()
        special[f"mean of [{value!r}] * 2"] = got
        print(f"- float64 mean of [{value!r}] * 2: {got!r}")
    results["special"] = special
    print(f"\n({time.time() - t0:.0f} s)")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
