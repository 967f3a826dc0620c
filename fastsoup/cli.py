"""The ``fastsoup`` command line.

    fastsoup average IN [IN ...] -o OUT [--weights W ...] [--dtype {fp16,bf16,fp32}]
                     [--shard-size 5GB] [--threads N] [--no-progress] [--overwrite] [--fsync]
    fastsoup info

Errors are one line on stderr (no traceback) and a non-zero exit code; nothing is left at OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastsoup", description="Fast, memory-bounded model soups.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("average", help="average checkpoints (uniform or weighted) into one",
                       description="Average checkpoints: sum_k w_k * theta_k / sum_k w_k, streamed from disk.")
    a.add_argument("inputs", nargs="+", metavar="IN",
                   help=".safetensors files, sharded folders or index files, .pt/.bin files")
    a.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="output: a path ending in .safetensors for one file, else a sharded folder")
    a.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per input (default: uniform)")
    a.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="output dtype (default: as the first input)")
    a.add_argument("--shard-size", metavar="SIZE", help="largest output shard, e.g. 5GB (default: as the first input)")
    a.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: all)")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    a.add_argument("--fsync", action="store_true", help="flush OUT to disk before it appears (durable, slower)")

    sub.add_parser("info", help="what the native core uses on this machine")
    return p


def _average(args) -> int:
    from .engine import average

    start = time.perf_counter()
    path = average(
        args.inputs,
        args.weights,
        out=args.out,
        dtype=args.dtype,
        threads=args.threads,
        shard_size=args.shard_size,
        progress=False if args.no_progress else None,
        overwrite=args.overwrite,
        fsync=args.fsync,
    )
    print(f"wrote {path} from {len(args.inputs)} checkpoints in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from . import FastsoupError, native_info

        if args.command == "info":
            print(json.dumps(native_info(), indent=2))
            return 0
        return _average(args)
    except KeyboardInterrupt:
        print("fastsoup: interrupted", file=sys.stderr)
        return 130
    except (FastsoupError, OSError, ValueError, TypeError) as e:
        # One line: multi-line messages (lists of problems) are joined.
        msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"fastsoup: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
