"""Runs a command as a child and reports its wall time and peak RSS (for whole-process contenders:
the `fastsoup average` command, mergekit).

    python -m benchmarks._peak CMD [ARG ...]

Prints one JSON line: {"seconds": wall time of CMD, "maxrss_mb": CMD's peak resident memory}.
The child is spawned from this small process, not from the benchmark driver: Linux carries the
spawning process's peak RSS into the child's ru_maxrss at exec, and the driver may be big (it
generates the checkpoints). stdout of CMD is discarded; its stderr is shown if it fails.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def main() -> int:
    cmd = sys.argv[1:]
    if not cmd:
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryFile() as err:
        devnull = os.open(os.devnull, os.O_WRONLY)
        t0 = time.perf_counter()
        pid = os.posix_spawnp(cmd[0], cmd, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, err.fileno(), 2)])
        _, status, usage = os.wait4(pid, 0)
        seconds = time.perf_counter() - t0
        os.close(devnull)
        rc = os.waitstatus_to_exitcode(status)
        if rc != 0:
            err.seek(0)
            sys.stderr.write(err.read()[-5000:].decode(errors="replace"))
            return rc if rc > 0 else 1
    print(json.dumps({"seconds": seconds, "maxrss_mb": usage.ru_maxrss / 1024}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
