"""The one harness every benchmark here uses: rounds and their figures, the page cache, the machine,
child processes (of this tree or of another source tree), peak memory, and writing the results.

Standard library only at import (``python -m benchmarks.harness CMD ...`` must stay a small
process, see :func:`peak_main`; torch and fastsoup are imported where they are needed), and only
fastsoup's public API (``fastsoup.native_info``, the ``fastsoup`` command): the same code drives
older builds side by side (``compare_builds.py``).

- figures: :func:`summarize` (median, min, max, IQR), :func:`rounds` (interleaved rounds, one run of
  every contender per round), :func:`timed` (repeated in-process timing, warm-up runs first);
- page cache: :func:`warm` (``cat`` of the inputs: this VM's DAMON pages out page cache idle for
  about a minute), :func:`drop_caches`, :func:`prepare`, :func:`input_files`, :func:`nbytes`;
- the machine: :func:`machine` (CPU, cores, RAM, ISA, torch, fastsoup, git commit), :func:`loadavg`,
  and the noise of a shared machine: :func:`wait_idle`, :func:`wait_quiet`, :class:`ForeignCPU`;
- child processes: :func:`run_module` / :func:`run_python` (a fresh interpreter, with a timeout and
  an environment; ``tree=`` runs it against another source tree's fastsoup while this tree's
  ``benchmarks`` package supplies the benchmark code), :func:`fastsoup_cli`, :func:`run_peak` (a
  whole process's wall time and peak RSS), :func:`peak_rss_mb` (this process's);
- results: :class:`Log` (print and keep the lines), :func:`write_json`, :func:`write_text`,
  :func:`write_between_markers`, :func:`command_line`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
DEFAULT_TIMEOUT = 3600.0  # seconds a child process may run before it is killed


# ---------------------------------------------------------------------------------------------------
# Figures


def summarize(values) -> dict:
    """``{"n", "median", "min", "max", "q1", "q3", "iqr"}`` of a list of numbers (quartiles: the
    inclusive method, so two values give their own min and max)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("summarize: no values")
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0], xs[0], xs[0])
    return {"n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3,
            "iqr": q3 - q1}


def median_of(runs, key):
    """The median of ``run[key]`` over a list of result dicts."""
    return statistics.median(r[key] for r in runs)


def numeric_keys(result: dict) -> list:
    """The keys of a result whose values are numbers (not bools, not the process id)."""
    return [k for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "pid"]


def rounds(fns: dict, runs: int, *, limit: dict | None = None, on_round=None, verbose: bool = False):
    """Interleaved rounds: one run of every contender (``fns``: name -> callable returning a result
    dict with ``"seconds"``) per round, ``runs`` rounds, so that drift in the machine's load hits
    every contender alike. A contender named in ``limit`` runs only in its first ``limit[name]``
    rounds; ``on_round(i)`` is called before round i.

    Returns ``(table, loads)``: per contender the median of every numeric figure, ``min_seconds``,
    ``runs`` (every run's seconds) and ``maxrss_runs`` where there is a peak RSS; ``loads``: the
    1-minute load average before the first round and after every round."""
    limit = limit or {}
    raw = {name: [] for name in fns}
    loads = [loadavg()]
    for i in range(runs):
        if on_round:
            on_round(i)
        for name, fn in fns.items():
            if i < limit.get(name, runs):
                raw[name].append(fn())
        loads.append(loadavg())
        if verbose:
            print(f"    round {i + 1}/{runs} done (load average {loads[-1]:.1f})", flush=True)
    table = {}
    for name, results in raw.items():
        keys = numeric_keys(results[0])
        table[name] = {k: median_of(results, k) for k in keys}
        table[name]["min_seconds"] = min(r["seconds"] for r in results)
        table[name]["runs"] = [r["seconds"] for r in results]
        if "maxrss_mb" in keys:
            table[name]["maxrss_runs"] = [r["maxrss_mb"] for r in results]
    return table, loads


def timed(fn, runs: int, *, sync=None, warmup: int = 0):
    """Times ``fn()`` ``runs`` times in this process (after ``warmup`` untimed calls); ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before and after each call, inside the clock's ends. Returns
    ``(median seconds, every run's seconds)``."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(runs):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


# ---------------------------------------------------------------------------------------------------
# The page cache


def input_files(paths) -> list:
    """Every file of the inputs (a folder: its files, sorted)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p))
        else:
            out.append(p)
    return out


def nbytes(paths) -> int:
    return sum(os.path.getsize(f) for f in input_files(paths))


def warm(paths) -> None:
    """Reads the inputs once (not timed) so a hot run finds them in the page cache. Needed here:
    this VM's DAMON pages out page cache idle for about a minute, at up to 128 MB/s."""
    subprocess.run(["cat", *input_files(paths)], stdout=subprocess.DEVNULL, check=True)


def drop_caches() -> bool:
    """Drops the page cache (needs root); False where it cannot."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def prepare(paths, cold: bool) -> None:
    """Before a run: the page cache dropped (cold) or the inputs read into it (hot)."""
    if cold:
        drop_caches()
    else:
        warm(paths)


def remove(path) -> None:
    """Removes a file or a folder, if there."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


# ---------------------------------------------------------------------------------------------------
# The machine


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def lscpu() -> dict:
    """``lscpu``'s fields (empty where there is no lscpu)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in out.splitlines():
        k, _, v = line.partition(":")
        fields[k.strip()] = v.strip()
    return fields


def native_info(fastsoup) -> dict:
    """``fastsoup.native_info()``; for builds older than it, what their ``_core`` tells."""
    if hasattr(fastsoup, "native_info"):
        return fastsoup.native_info()
    core = fastsoup._core
    return {"version": getattr(core, "__version__", None), "isa": core.isa(), "threads": None,
            "cuda_available": False}


def git_info(root: str = ROOT) -> dict:
    """``{"git_commit": short hash, "git_dirty_package_files": [...]}`` of a source tree (the package
    and native sources only: fastsoup/, csrc/); empty outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastsoup", "csrc"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty_package_files": [line[3:] for line in dirty if line.strip()]}


def machine(root: str = ROOT) -> dict:
    """What the figures were measured on: ``cpu`` (model name), ``nproc`` (CPUs this process may
    use), ``ram_gib``, ``kernel``, ``python``, ``torch`` and ``torch_threads`` (None without torch),
    ``fastsoup`` (the native core's version), ``fastsoup_path``, ``isa``, ``threads``,
    ``cuda_available``, ``native`` (all of native_info), ``lscpu`` (a few of its fields), and the
    git commit of ``root``. Imports fastsoup (and torch where installed)."""
    import fastsoup

    cpu = lscpu()
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    try:
        import torch

        tv, tt = torch.__version__, torch.get_num_threads()
    except ImportError:
        tv = tt = None
    ni = native_info(fastsoup)
    info = {"cpu": cpu.get("Model name") or platform.processor() or platform.machine(),
            "nproc": len(os.sched_getaffinity(0)), "ram_gib": mem / 2**30, "kernel": platform.release(),
            "python": platform.python_version(), "torch": tv, "torch_threads": tt,
            "fastsoup": ni.get("version") or getattr(fastsoup, "__version__", None),
            "fastsoup_path": os.path.dirname(os.path.abspath(fastsoup.__file__)), "isa": ni.get("isa"),
            "threads": ni.get("threads"), "cuda_available": bool(ni.get("cuda_available")), "native": ni,
            "lscpu": {k: cpu[k] for k in ("Model name", "CPU(s)", "Thread(s) per core", "L3 cache") if k in cpu}}
    info.update(git_info(root))
    return info


def _proc_stat():
    """(busy CPU-seconds of the whole machine, idle + iowait ticks, all ticks) from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0, 1
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK"), idle, sum(v)


def cpu_idle_fraction(interval: float = 1.0) -> float:
    """The machine's idle fraction over ``interval`` seconds."""
    _, i0, t0 = _proc_stat()
    time.sleep(interval)
    _, i1, t1 = _proc_stat()
    return (i1 - i0) / max(t1 - t0, 1)


def wait_idle(limit: float, threshold: float = 0.85) -> bool:
    """Waits up to ``limit`` seconds for a one-second sample in which the CPUs are at least
    ``threshold`` idle; False if none came (the same rule for every contender)."""
    end = time.time() + limit
    while time.time() < end:
        if cpu_idle_fraction() >= threshold:
            return True
    return False


def _own_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class ForeignCPU:
    """CPU seconds that other processes used while the block ran (/proc/stat busy time of the whole
    machine minus this process's own CPU time): how noisy the machine was during a run."""

    def __enter__(self):
        self.busy, self.own = _proc_stat()[0], _own_seconds()
        return self

    def __exit__(self, *exc):
        self.seconds = max(0.0, (_proc_stat()[0] - self.busy) - (_own_seconds() - self.own))
        return False


def wait_quiet(max_wait: float, window: float = 0.5, threshold: float = 0.1) -> float:
    """Waits (up to ``max_wait`` seconds) until other processes use under ``threshold`` of a CPU
    over a ``window``; returns the seconds waited. Other work on a 2-vCPU machine slows torch's two
    OpenMP threads many times over, so a timed run starts on a quiet machine when it can."""
    t0 = time.perf_counter()
    while True:
        with ForeignCPU() as noise:
            time.sleep(window)
        waited = time.perf_counter() - t0
        if noise.seconds < threshold * window or waited >= max_wait:
            return waited


# ---------------------------------------------------------------------------------------------------
# Child processes

# Runs a module of THIS tree's benchmarks package in an interpreter whose fastsoup comes from another
# source tree (PYTHONPATH and the working directory set to that tree): the package is registered
# from its folder before anything imports it, so the tree's own benchmarks/ (older, or absent) is
# never read.
_BOOT = r"""
import importlib.util, runpy, sys
here, module = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("benchmarks", here + "/__init__.py", submodule_search_locations=[here])
pkg = importlib.util.module_from_spec(spec)
sys.modules["benchmarks"] = pkg
spec.loader.exec_module(pkg)
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


class ChildError(RuntimeError):
    """A child process failed, timed out, or did not print its JSON line."""


def _child(argv, *, tree, env, timeout, what):
    full_env = dict(os.environ)
    if tree is not None:
        full_env["PYTHONPATH"] = os.path.abspath(tree)
    full_env.update(env or {})
    cwd = os.path.abspath(tree) if tree is not None else ROOT
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    try:
        r = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ChildError(f"{what}{f' (tree {tree})' if tree else ''}: no result within {timeout} s") from None
    if r.returncode != 0:
        raise ChildError(f"{what}{f' (tree {tree})' if tree else ''} failed:\n{r.stderr[-5000:]}")
    try:
        res = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise ChildError(f"{what}: no JSON result line in its output:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}") from None
    if tree is not None and isinstance(res, dict) and "fastsoup" in res:
        where = os.path.realpath(res["fastsoup"])
        if not where.startswith(os.path.realpath(tree) + os.sep):
            raise ChildError(f"{what}: tree {tree} imported fastsoup from {res['fastsoup']}")
    return res


def run_module(module: str, args=(), *, tree: str | None = None, env: dict | None = None,
               timeout: float | None = None) -> dict:
    """``python -m MODULE ARGS...`` in a fresh interpreter; returns the JSON object of the last line
    it prints. ``tree=None``: this tree (working directory the repository root). ``tree=PATH``: the
    module still comes from this tree's ``benchmarks`` package, but ``fastsoup`` from PATH
    (``PYTHONPATH`` and the working directory set to it; a result that names its ``"fastsoup"``
    file is checked to come from there). ``env``: variables added to the environment; ``timeout``:
    seconds (default :data:`DEFAULT_TIMEOUT`). Raises :class:`ChildError`."""
    if tree is None:
        argv = [sys.executable, "-m", module, *args]
    else:
        argv = [sys.executable, "-c", _BOOT, HERE, module, *args]
    return _child(argv, tree=tree, env=env, timeout=timeout, what=module)


def run_python(code: str, args=(), *, tree: str | None = None, env: dict | None = None,
               timeout: float | None = None) -> dict:
    """``python -c CODE ARGS...``, as :func:`run_module` (a snippet that imports only fastsoup)."""
    return _child([sys.executable, "-c", code, *args], tree=tree, env=env, timeout=timeout, what="python -c")


def fastsoup_cli() -> list:
    """The ``fastsoup`` command: the venv's console script, else ``python -m fastsoup``."""
    exe = os.path.join(os.path.dirname(sys.executable), "fastsoup")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "fastsoup"]


def run_timed(cmd, *, timeout: float | None = None, what: str | None = None) -> float:
    """Runs a command to the end; returns its wall time (seconds). Raises :class:`ChildError`."""
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ChildError(f"{what or cmd[0]}: not done within {timeout} s") from None
    if r.returncode != 0:
        raise ChildError(f"{what or cmd[0]} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def run_peak(cmd, *, timeout: float | None = None) -> dict:
    """A whole process: ``{"seconds": its wall time, "maxrss_mb": its peak RSS, "process_seconds":
    the same seen from here}``, spawned through ``python -m benchmarks.harness`` (see
    :func:`peak_main`)."""
    t0 = time.perf_counter()
    res = _child([sys.executable, "-m", "benchmarks.harness", *cmd], tree=None, env=None, timeout=timeout, what=cmd[0])
    res["process_seconds"] = time.perf_counter() - t0
    return res


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    across exec, so a child spawned by a big parent would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def peak_main(cmd) -> int:
    """``python -m benchmarks.harness CMD [ARG ...]``: runs CMD as a child and prints one JSON line,
    ``{"seconds": its wall time, "maxrss_mb": its peak resident memory}``. The child is spawned
    from this small process, not from the benchmark driver: Linux carries the spawning process's peak
    RSS into the child's ru_maxrss at exec, and the driver may be big (it generates the checkpoints).
    CMD's stdout is discarded; its stderr is shown if it fails."""
    if not cmd:
        print(peak_main.__doc__, file=sys.stderr)
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


# ---------------------------------------------------------------------------------------------------
# Results


class Log:
    """``log(line)`` prints a line (flushed) and keeps it; ``log.write(path)`` writes them all."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, s: str = "") -> None:
        print(s, flush=True)
        self.lines.append(s)

    def write(self, path: str) -> None:
        write_text(path, "\n".join(self.lines) + "\n")


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, obj, indent: int = 2) -> None:
    """The raw figures as JSON (what JSON cannot hold is written as its ``str``)."""
    write_text(path, json.dumps(obj, indent=indent, default=str))


def write_between_markers(path: str, block: str, begin: str, end: str) -> None:
    """Replaces the text from ``begin`` to ``end`` in ``path`` with ``block`` (which carries the
    markers); appends the block where the markers are missing. Nothing else in the file changes."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    i, j = text.find(begin), text.find(end)
    if i >= 0 and j > i:
        text = text[:i] + block.rstrip("\n") + text[j + len(end):]
    else:
        text = text + ("" if text.endswith("\n") or not text else "\n") + ("\n" if text else "") + block
    write_text(path, text)


def command_line(prog: str, argv=None) -> str:
    """``prog`` and the arguments (default: this process's), quoted as a shell would need them."""
    args = sys.argv[1:] if argv is None else list(argv)
    return prog + "".join(" " + shlex.quote(a) for a in args)


if __name__ == "__main__":
    raise SystemExit(peak_main(sys.argv[1:]))
