import fnmatch
import os
import tempfile

import pytest

import fastsoup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What building and running the tests may create in the checkout (git-ignored build products).
_IGNORED = [".git", ".venv", "build", "dist", ".pytest_cache", "__pycache__", "*.egg-info", ".benchmarks",
            "fastsoup/_core*.so", "compile_commands.json"]


def _ignored(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(os.path.basename(rel), pat) for pat in _IGNORED)


def tree_snapshot(root: str) -> set:
    """Every path under ``root`` (relative), but the build products of ``_IGNORED``."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if not _ignored(os.path.normpath(os.path.join(rel_dir, d)))]
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if not _ignored(rel):
                out.add(rel)
    return out


def _watched() -> dict:
    """The places no test may leave a file in: the checkout, the current folder, the home folder."""
    places = {ROOT: None, os.getcwd(): None}
    home = os.path.expanduser("~")
    if os.path.isdir(home):
        places[home] = "top"  # its top level only
    out = {}
    for place, depth in places.items():
        if depth == "top":
            out[place] = set(os.listdir(place))
        else:
            out[place] = tree_snapshot(place)
    return out


def pytest_sessionstart(session):
    # Temporary files of the tests and their subprocesses go under pytest's own base folder.
    base = session.config._tmp_path_factory.getbasetemp() if hasattr(session.config, "_tmp_path_factory") else None
    if base is not None:
        tmp = os.path.join(str(base), "tmpdir")
        os.makedirs(tmp, exist_ok=True)
        os.environ["TMPDIR"] = tmp
        tempfile.tempdir = tmp
    session.config._fastsoup_watched = _watched()


def pytest_sessionfinish(session, exitstatus):
    """No test may leave files outside its tmp path: anything new in the checkout, the current folder
    or the home folder fails the run."""
    before = getattr(session.config, "_fastsoup_watched", None)
    if before is None:
        return
    after = _watched()
    new = sorted({os.path.join(place, p) for place in before for p in after.get(place, set()) - before[place]})
    if new:
        shown = "\n  ".join(new[:20])
        session.config.get_terminal_writer().line(
            f"\nfastsoup: tests left {len(new)} file(s) outside their tmp paths:\n  {shown}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def bits_equal(a, b) -> bool:
    """Same dtype, shape and bytes (so -0.0 != +0.0 and NaN payloads count)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def tree_bytes(path) -> dict[str, bytes]:
    """Every file under path (or path itself) -> its bytes: to check that a tree was left as it was."""
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


@pytest.fixture(params=fastsoup._core.supported_isas())
def isa(request):
    """Runs a test once per CPU instruction set this machine supports (scalar, avx2, avx512)."""
    previous = fastsoup._core.isa()
    fastsoup._core.set_isa(request.param)
    yield request.param
    fastsoup._core.set_isa(previous)
