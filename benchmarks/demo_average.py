"""The main job until `fastsoup demo` exists: make a small zoo of fine-tune-like checkpoints, soup
them with the `fastsoup average` command, and check the soup against naive torch averaging.

    python -m benchmarks.demo_average [--out demo_out] [--models 8] [--config vit-s16]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from safetensors.torch import load_file

from .checkpoints import CONFIGS, make_zoo
from .harness import fastsoup_cli, run_timed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--config", default="vit-s16", choices=sorted(CONFIGS))
    args = ap.parse_args(argv)

    cfg = CONFIGS[args.config]
    print(f"1. making {args.models} fine-tune-like {cfg.name} checkpoints ({cfg.params / 1e6:.0f}M params, fp16) in {args.out}/")
    paths = make_zoo(os.path.join(args.out, "zoo"), args.config, args.models)
    soup = os.path.join(args.out, "soup.safetensors")

    cmd = ["fastsoup", "average", *paths, "-o", soup, "--overwrite"]
    print("2. " + " ".join([cmd[0], cmd[1], f"{args.out}/zoo/*.safetensors", *cmd[-3:]]))
    t_fast = run_timed([*fastsoup_cli(), *cmd[1:]])

    print("3. checking against the naive loop (load_file, acc += t.float(), divide, cast)")
    t0 = time.perf_counter()
    acc = None
    for p in paths:
        sd = load_file(p)
        if acc is None:
            acc = {k: v.float() for k, v in sd.items()}
        else:
            for k, v in sd.items():
                acc[k] += v.float()
    naive = {k: (v / len(paths)).half() for k, v in acc.items()}
    t_naive = time.perf_counter() - t0
    got = load_file(soup)
    worst = max(((got[k].float() - naive[k].float()).abs() / naive[k].float().abs().clamp_min(1e-3)).max().item() for k in naive)
    same = sum(torch.equal(got[k], naive[k]) for k in naive)
    print(f"   {same}/{len(naive)} tensors bit-identical to the naive loop, largest relative difference {worst:.2e}"
          " (fastsoup sums w_k*theta_k in float32; the naive loop divides at the end)")
    print(f"   fastsoup average (whole process): {t_fast:.2f} s   naive loop (in this process): {t_naive:.2f} s")
    print(f"soup written to {soup}")
    return 0 if worst < 2e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
