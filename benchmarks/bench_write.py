"""How to write the output: pwrite() from a reused buffer, or stores into a shared mapping of the
new file? (The writer uses the faster; see benchmarks/RESULTS.md.)

    python -m benchmarks.bench_write [--mb 608] [--runs 7] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import mmap
import os
import time

from .harness import rounds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=608, help="output size (608 MB: a ViT-L/14 in fp16)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--dir", default="/tmp")
    args = ap.parse_args(argv)
    size = args.mb << 20
    chunk = 16 << 20
    buf = bytearray(b"\x01") * chunk
    path = os.path.join(args.dir, f"fastsoup-write-test-{os.getpid()}.bin")

    def pwrite():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, size)
        t0 = time.perf_counter()
        for off in range(0, size, chunk):
            os.pwrite(fd, buf, off)
        seconds = time.perf_counter() - t0
        os.close(fd)
        os.unlink(path)
        return {"seconds": seconds}

    def mapped():
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size)
        t0 = time.perf_counter()
        for off in range(0, size, chunk):
            m[off : off + chunk] = buf
        seconds = time.perf_counter() - t0
        m.close()
        os.close(fd)
        os.unlink(path)
        return {"seconds": seconds}

    table, _ = rounds({"pwrite from a reused 16 MiB buffer": pwrite, "stores into a shared mapping": mapped}, args.runs)
    for name, r in table.items():
        print(f"{name:40s} median {size / r['seconds'] / 1e9:5.2f} GB/s   "
              f"(runs: {', '.join(f'{size / t / 1e9:.2f}' for t in r['runs'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
