"""fastsoup never loses or corrupts a user's data (issue 19): what ``overwrite`` may replace, an
exclusive install, inputs that change (truncated, rewritten) or are not files (FIFOs, devices)
under a merge, the safetensors format rules, clean errors, signals and the temporary files of
killed runs.

Merges that must be disturbed midway run in a subprocess (a truncated input used to kill the
process with SIGBUS; a FIFO used to hang it), with a hook in the engine that acts once the output's
temporary files exist and the inputs are mapped: ``engine.Segments.run`` is wrapped.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

import fastsoup
from fastsoup import CheckpointError

from conftest import tree_bytes

TIMEOUT = 60  # seconds for one subprocess: a hang fails the test instead of hanging CI
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ---------------------------------------------------------------------------------------------------
# helpers


def make_inputs(folder, k=3, numel=1 << 16, dtype=torch.float32, seed=0) -> list[str]:
    """k safetensors checkpoints of two tensors (numel elements each: several pages) in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(k):
        sd = {"a.weight": torch.randn(numel, generator=gen).to(dtype), "b.weight": torch.randn(numel, generator=gen).to(dtype)}
        p = os.path.join(folder, f"m{i}.safetensors")
        save_file(sd, p)
        paths.append(p)
    return paths


def temp_leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n or ".old-" in n)


def env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))


def cli(*args, cwd=None, timeout=TIMEOUT):
    """``python -m fastsoup ARGS``; a hang fails the test."""
    try:
        return subprocess.run([sys.executable, "-m", "fastsoup", *map(str, args)], capture_output=True, text=True,
                              cwd=cwd, env=env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fastsoup {' '.join(map(str, args))} hung for {timeout} s")


DRIVER = """
import os, sys, time
import fastsoup.engine as engine
from fastsoup import cli

_run = engine.Segments.run
_done = []

def run(self, *args, **kwargs):
    if not _done:  # once: the output's temporary files exist, the inputs are open and mapped
        _done.append(1)
{hook}
    return _run(self, *args, **kwargs)

engine.Segments.run = run
sys.exit(cli.main({argv!r}))
"""


def cli_with_hook(argv, hook: str, *, wait=True, timeout=TIMEOUT):
    """Runs the CLI in a child whose merge first runs ``hook`` (Python, inside the engine)."""
    code = DRIVER.format(hook=textwrap.indent(textwrap.dedent(hook), " " * 8), argv=[str(a) for a in argv])
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env())
    if not wait:
        return p
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate(timeout=TIMEOUT)
        pytest.fail(f"the merge hung for {timeout} s")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def one_line_error(r) -> str:
    """The CLI's error: exit code 1 and one line on stderr starting 'fastsoup: error:' (no traceback)."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("fastsoup: error: "), r.stderr[-3000:]
    return lines[0]


def write_raw_st(path, header: dict, data: bytes, *, header_bytes: bytes | None = None, n: int | None = None):
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if n is None else n) + raw + data)


def open_fails(path) -> str:
    with pytest.raises(CheckpointError) as ei:
        fastsoup.open_checkpoint(str(path))
    msg = str(ei.value)
    assert str(path) in msg
    return msg


# ---------------------------------------------------------------------------------------------------
# 1. What --overwrite may replace


def test_overwrite_never_deletes_the_folder_of_the_inputs(tmp_path):
    runs = tmp_path / "runs"
    paths = make_inputs(runs, 2)
    before = tree_bytes(runs)
    r = cli("average", *paths, "-o", runs, "--overwrite", "--no-progress")
    msg = one_line_error(r)
    assert "holds the input" in msg and str(runs) in msg
    assert tree_bytes(runs) == before and temp_leftovers(tmp_path) == []


def test_overwrite_never_deletes_the_current_folder_or_an_ancestor(tmp_path):
    paths = make_inputs(tmp_path / "in", 2)
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    for out, where in ((".", work), ("..", work), (str(tmp_path / "work"), work)):
        r = cli("average", *paths, "-o", out, "--overwrite", "--no-progress", cwd=where)
        msg = one_line_error(r)
        assert "current folder" in msg
    assert (work / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path / "work")) == ["deep"]


def test_overwrite_never_deletes_a_folder_with_files_fastsoup_did_not_write(tmp_path):
    paths = make_inputs(tmp_path / "in", 2)
    out = tmp_path / "soup"
    assert cli("average", *paths, "-o", out, "--no-progress").returncode == 0
    (out / "config.json").write_text('{"model_type": "mine"}')  # the user adds a file of their own
    before = tree_bytes(out)
    msg = one_line_error(cli("average", *paths, "-o", out, "--overwrite", "--no-progress"))
    assert "'config.json', which fastsoup did not write" in msg
    assert tree_bytes(out) == before
    (out / "config.json").unlink()
    (out / "sub").mkdir()  # a folder inside
    msg = one_line_error(cli("average", *paths, "-o", out, "--overwrite", "--no-progress"))
    assert "'sub'" in msg
    (out / "sub").rmdir()
    shard = next(n for n in os.listdir(out) if n.endswith(".safetensors"))
    with open(out / shard, "ab") as f:  # a file fastsoup wrote, changed since
        f.write(b"x")
    msg = one_line_error(cli("average", *paths, "-o", out, "--overwrite", "--no-progress"))
    assert "changed after fastsoup wrote it" in msg


def test_overwrite_replaces_what_fastsoup_wrote(tmp_path):
    paths = make_inputs(tmp_path / "in", 3)
    for out in (tmp_path / "soup", tmp_path / "soup.safetensors"):
        assert cli("average", *paths[:2], "-o", out, "--no-progress").returncode == 0
        r = cli("average", *paths, "-o", out, "--overwrite", "--no-progress")
        assert r.returncode == 0, r.stderr
        got = fastsoup.open_checkpoint(str(out))
        want = fastsoup.average(paths)
        assert all(torch.equal(got.tensor(n), want[n]) for n in want)
    assert temp_leftovers(tmp_path) == []


def test_overwrite_of_a_symlink_replaces_the_link_not_its_target(tmp_path):
    paths = make_inputs(tmp_path / "in", 2)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    link = tmp_path / "soup"
    link.symlink_to(precious)
    r = cli("average", *paths, "-o", link, "--overwrite", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert not link.is_symlink() and (link / "model.safetensors.index.json").exists()
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_overwrite_api_refuses_with_a_clear_error(tmp_path):
    paths = make_inputs(tmp_path / "runs", 2)
    with pytest.raises(fastsoup.UnsafeOutputError, match="holds the input"):
        fastsoup.average(paths, out=tmp_path / "runs", overwrite=True)
    assert sorted(os.listdir(tmp_path / "runs")) == ["m0.safetensors", "m1.safetensors"]


# ---------------------------------------------------------------------------------------------------
# 2. An output that appears during the merge is never replaced without --overwrite


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_an_output_that_appears_during_the_merge_is_not_replaced(tmp_path, kind):
    paths = make_inputs(tmp_path / "in", 2)
    out = tmp_path / ("soup.safetensors" if kind == "file" else "soup")
    # another process creates OUT while fastsoup merges (an empty folder, or a file)
    hook = (f"open({str(out)!r}, 'w').write('theirs')" if kind == "file" else f"os.mkdir({str(out)!r})")
    r = cli_with_hook(["average", *paths, "-o", out, "--no-progress"], hook)
    msg = one_line_error(r)
    assert "exists" in msg and "appeared" in msg
    if kind == "file":
        assert out.read_text() == "theirs"
    else:
        assert out.is_dir() and os.listdir(out) == []
    assert temp_leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# 3, 4. Inputs that change during a merge


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("out_name", ["soup.safetensors", "soup"])
def test_an_input_truncated_during_the_merge_is_an_error_not_a_crash(tmp_path, fmt, out_name):
    paths = make_inputs(tmp_path / "in", 3)
    if fmt == "pt":
        pt = []
        for p in paths:
            ck = fastsoup.open_checkpoint(p)
            q = p.replace(".safetensors", ".pt")
            torch.save({n: ck.tensor(n) for n in ck}, q)
            pt.append(q)
        paths = pt
    victim = paths[1]
    out = tmp_path / out_name
    r = cli_with_hook(["average", *paths, "-o", out, "--no-progress"], f"os.truncate({victim!r}, 4096)")
    msg = one_line_error(r)  # rc 135 (SIGBUS) before
    assert victim in msg and "changed during the merge" in msg
    assert not out.exists() and temp_leftovers(tmp_path) == []


def test_an_input_rewritten_in_place_during_the_merge_is_an_error(tmp_path):
    paths = make_inputs(tmp_path / "in", 3)
    victim = paths[2]
    data = open(victim, "rb").read()
    out = tmp_path / "soup.safetensors"
    # same size, other values, written in place (as cp or torch.save over the file do)
    hook = f"""
    time.sleep(0.05)
    with open({victim!r}, "r+b") as f:
        f.seek({len(data) // 2})
        f.write(b"\\x11" * 4096)
    """
    r = cli_with_hook(["average", *paths, "-o", out, "--no-progress"], hook)
    msg = one_line_error(r)  # rc 0 and a mix of old and new data before
    assert victim in msg and "changed during the merge" in msg and "rewritten in place" in msg
    assert not out.exists() and temp_leftovers(tmp_path) == []


def test_api_in_memory_result_is_not_returned_from_a_changed_input(tmp_path, monkeypatch):
    import fastsoup.engine as engine

    paths = make_inputs(tmp_path / "in", 2)
    real = engine.Segments.run

    def run(self, *a, **k):
        time.sleep(0.05)
        with open(paths[0], "r+b") as f:
            f.seek(os.path.getsize(paths[0]) - 8)
            f.write(b"\x00" * 8)
        return real(self, *a, **k)

    monkeypatch.setattr(engine.Segments, "run", run)
    with pytest.raises(fastsoup.InputChangedError, match="changed during the merge"):
        fastsoup.average(paths)


def test_a_truncated_mapping_reads_zeros_and_is_reported(tmp_path):
    # The guard itself: a read past the new end of a mapped file neither crashes nor goes unnoticed.
    p = tmp_path / "g.bin"
    p.write_bytes(b"\x01" * (1 << 20))
    m = fastsoup._core.MappedFile(str(p))
    view = memoryview(m)
    assert view[600_000] == 1 and m.faults == 0
    os.truncate(p, 4096)
    assert view[600_000] == 0 and view[4095] == 1  # the page still in the file keeps its data
    assert m.faults >= 1
    ck = fastsoup.open_checkpoint(make_inputs(tmp_path / "in", 1)[0])
    os.truncate(ck.files[0], 4096)
    with pytest.raises(fastsoup.InputChangedError, match="truncated"):
        ck.tensor("b.weight")  # reads past the end (zeros), then checks: refused
    with pytest.raises(fastsoup.InputChangedError, match="truncated"):
        ck.verify()


def test_a_fault_outside_guarded_mappings_still_crashes(tmp_path):
    # The handler only takes faults of fastsoup's own mappings: others keep their default action.
    code = textwrap.dedent(f"""
        import mmap, os, fastsoup
        p = {str(tmp_path / "other.bin")!r}
        open(p, "wb").write(b"x" * 65536)
        g = fastsoup._core.MappedFile(p)  # installs the handler
        f = open(p, "rb")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        os.truncate(p, 0)
        print(mm[40000])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert r.returncode == -signal.SIGBUS


def test_fingerprinting_a_truncated_checkpoint_is_an_error(tmp_path):
    from fastsoup.search.cache import fingerprint_checkpoint

    code = textwrap.dedent(f"""
        import os, sys, fastsoup
        from fastsoup.search.cache import fingerprint_checkpoint
        ck = fastsoup.open_checkpoint({make_inputs(tmp_path / "in", 1)[0]!r})
        os.truncate(ck.files[0], 4096)
        try:
            fingerprint_checkpoint(ck)
        except fastsoup.InputChangedError as e:
            print("refused:", e)
            sys.exit(0)
        sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert r.returncode == 0 and "refused:" in r.stdout, (r.returncode, r.stderr[-2000:])
    assert callable(fingerprint_checkpoint)


def test_a_truncated_stored_heldout_set_is_an_error_not_a_crash(tmp_path):
    # A search on the CPU reads the held-out set stored in its cache memory-mapped, at every
    # evaluation; truncated meanwhile, it must stop with an error, not score zeros (or die).
    code = textwrap.dedent(f"""
        import os, sys, torch, fastsoup
        from fastsoup.search import Store, evaluate, load_heldout, prepare
        prefix = {str(tmp_path / "data" / "heldout")!r}
        s = Store(prefix)
        for i in range(4):
            s.add(torch.randn(256, 512), torch.randint(0, 4, (256,)))
        s.finish("heldout", "fp")
        s.install()
        batches, fp = load_heldout(prefix)
        held = prepare(batches, "cpu")
        model = torch.nn.Linear(512, 4)
        evaluate(model, held)
        os.truncate(prefix + ".bin", 4096)
        try:
            evaluate(model, held)  # reads past the end: zeros (SIGBUS before), then refused
        except fastsoup.InputChangedError as e:
            print("refused:", e)
            sys.exit(0)
        sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert r.returncode == 0 and "refused:" in r.stdout and "heldout.bin" in r.stdout, (r.returncode, r.stderr[-2000:])


# ---------------------------------------------------------------------------------------------------
# 5. FIFOs and devices


@pytest.mark.parametrize("name", ["pipe.safetensors", "pipe.pt", "pipe"])
def test_a_fifo_input_is_refused_at_once(tmp_path, name):
    paths = make_inputs(tmp_path / "in", 1)
    fifo = tmp_path / name
    os.mkfifo(fifo)
    r = cli("average", fifo, *paths, "-o", tmp_path / "soup", "--no-progress", timeout=30)  # hung before
    msg = one_line_error(r)
    assert str(fifo) in msg and "FIFO" in msg


def test_a_fifo_shard_of_a_folder_is_refused(tmp_path):
    paths = make_inputs(tmp_path / "in", 1)
    folder = tmp_path / "hf"
    fastsoup.save(fastsoup.open_checkpoint(paths[0]), folder, shard_size="300KB")
    shard = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))[-1]
    os.unlink(folder / shard)
    os.mkfifo(folder / shard)
    msg = one_line_error(cli("average", folder, "-o", tmp_path / "soup", "--no-progress", timeout=30))
    assert shard in msg and "FIFO" in msg


def test_a_device_input_is_named_as_a_device(tmp_path):
    paths = make_inputs(tmp_path / "in", 1)
    msg = one_line_error(cli("average", "/dev/zero", *paths, "-o", tmp_path / "soup", "--no-progress", timeout=30))
    assert "/dev/zero" in msg and "character device" in msg


# ---------------------------------------------------------------------------------------------------
# 6. Format rules: as strict as the safetensors reader (or stricter)


def _two(a=(0, 8), b=(8, 16)):
    return {"a": {"dtype": "F32", "shape": [2], "data_offsets": list(a)},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": list(b)}}


def test_a_hole_between_tensors_is_refused(tmp_path):
    p = tmp_path / "hole.safetensors"
    write_raw_st(p, _two(b=(12, 20)), b"\0" * 20)
    assert "'b'" in open_fails(p) and "belong to no tensor" in open_fails(p)


def test_trailing_bytes_after_the_last_tensor_are_refused(tmp_path):
    p = tmp_path / "trail.safetensors"
    write_raw_st(p, _two(), b"\0" * 17)
    assert "1 bytes unaccounted" in open_fails(p)


def test_a_gap_before_the_first_tensor_is_refused(tmp_path):
    p = tmp_path / "gap.safetensors"
    write_raw_st(p, _two(a=(4, 12), b=(12, 20)), b"\0" * 20)
    assert "'a'" in open_fails(p)


def test_a_header_length_a_few_bytes_short_is_refused(tmp_path):
    # JSON padded with spaces still parses when the length is short, and every tensor would be read
    # from the wrong place.
    p = tmp_path / "short.safetensors"
    raw = json.dumps(_two()).encode()
    raw += b" " * (8 - len(raw) % 8 + 8)
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(raw) - 5) + raw + b"\1" * 16)
    assert "unaccounted" in open_fails(p)


@pytest.mark.parametrize("where", ["tensor", "field", "metadata"])
def test_duplicate_json_keys_are_refused(tmp_path, where):
    p = tmp_path / "dup.safetensors"
    if where == "tensor":
        raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    elif where == "field":
        raw = b'{"a":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}'
    else:
        raw = b'{"__metadata__":{"k":"1"},"__metadata__":{"k":"2"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    write_raw_st(p, {}, b"\0" * 4, header_bytes=raw)
    assert "appears twice" in open_fails(p)


@pytest.mark.parametrize("name", ["\\ud800", "x\\udfffy"])
def test_names_with_lone_surrogates_are_refused(tmp_path, name):
    p = tmp_path / "sur.safetensors"
    raw = ('{"' + name + '":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}').encode()
    write_raw_st(p, {}, b"\0" * 4, header_bytes=raw)
    assert "not valid Unicode" in open_fails(p)


def test_invalid_utf8_in_the_header_is_refused(tmp_path):
    p = tmp_path / "bytes.safetensors"
    write_raw_st(p, {}, b"\0" * 4, header_bytes=b'{"\xff\xfe":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')
    assert "UTF-8" in open_fails(p)


def test_more_than_64_dimensions_are_refused(tmp_path):
    p = tmp_path / "dims.safetensors"
    write_raw_st(p, {"a": {"dtype": "U8", "shape": [1] * 65, "data_offsets": [0, 1]}}, b"\0")
    assert "65 dimensions" in open_fails(p)
    write_raw_st(p, {"a": {"dtype": "U8", "shape": [1] * 64, "data_offsets": [0, 1]}}, b"\0")
    assert fastsoup.open_checkpoint(str(p))["a"].shape == (1,) * 64


@pytest.mark.parametrize("shape", [[2**63, 0], [0, 2**64], [2**62, 2**62, 0]])
def test_huge_dimensions_are_refused(tmp_path, shape):
    p = tmp_path / "big.safetensors"
    write_raw_st(p, {"a": {"dtype": "U8", "shape": shape, "data_offsets": [0, 0]}}, b"")
    msg = open_fails(p)
    assert "'a'" in msg and ("2**63" in msg or "64-bit" in msg)


@pytest.mark.parametrize("st, shape, nbytes", [("F8_E8M0", [4], 4), ("F4", [4], 2), ("F6_E2M3", [4], 3),
                                               ("F8_E4M3FNUZ", [2], 2), ("C64", [1], 8)])
def test_safetensors_dtypes_fastsoup_does_not_average_are_named(tmp_path, st, shape, nbytes):
    p = tmp_path / "fp8.safetensors"
    write_raw_st(p, {"q": {"dtype": st, "shape": shape, "data_offsets": [0, nbytes]}}, b"\0" * nbytes)
    ck = fastsoup.open_checkpoint(str(p))  # readable (fastsoup inspect works) ...
    assert ck["q"].nbytes == nbytes
    msg = one_line_error(cli("average", p, p, "-o", tmp_path / "soup", "--no-progress"))
    assert f"unsupported dtype {st}" in msg and "'q'" in msg  # ... but not averaged: "unknown" before


# ---------------------------------------------------------------------------------------------------
# 7. Clean one-line errors


def test_a_sparse_tensor_in_a_torch_file_is_a_clean_error(tmp_path):
    p = tmp_path / "sparse.pt"
    torch.save({"w": torch.eye(4).to_sparse(), "b": torch.ones(4)}, p)
    msg = one_line_error(cli("average", p, p, "-o", tmp_path / "soup", "--no-progress"))
    assert str(p) in msg and "'w'" in msg and "sparse" in msg


def test_huge_weights_are_normalized_not_an_overflow(tmp_path):
    paths = make_inputs(tmp_path / "in", 2)
    out = tmp_path / "soup.safetensors"
    r = cli("average", *paths, "--weights", "1e308", "1e308", "-o", out, "--no-progress")
    assert r.returncode == 0, r.stderr  # an OverflowError traceback before
    got, want = fastsoup.open_checkpoint(str(out)), fastsoup.average(paths)
    from fastsoup._reference import ulp_distance

    assert all(int(ulp_distance(got.tensor(n), want[n]).max()) <= 1 for n in want)  # the uniform soup, to 1 ulp
    msg = one_line_error(cli("average", *paths, "--weights", "1e308", "-1e308", "-o", out, "--no-progress"))
    assert "sum to zero" in msg


def test_out_none_with_dimensions_torch_cannot_allocate_is_a_clean_error(tmp_path):
    p = tmp_path / "wide.safetensors"
    write_raw_st(p, {"a": {"dtype": "F32", "shape": [2**40, 2**30, 0], "data_offsets": [0, 0]}}, b"")
    with pytest.raises(CheckpointError) as ei:
        fastsoup.average([str(p), str(p)])
    assert "'a'" in str(ei.value) and str(p) in str(ei.value)


def test_a_full_disk_names_the_file_being_written(tmp_path):
    # RLIMIT_FSIZE makes writes past a size fail (EFBIG), as a full disk does (ENOSPC), in the
    # writer thread of the native executor.
    paths = make_inputs(tmp_path / "in", 2, numel=1 << 18)
    out = tmp_path / "soup"
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        from fastsoup import cli
        sys.exit(cli.main(["average", *{paths!r}, "-o", {str(out)!r}, "--no-progress"]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    msg = one_line_error(r)
    assert os.path.join(str(out), "model-00001-of-00001.safetensors") in msg and "output file" not in msg
    assert not out.exists() and temp_leftovers(tmp_path) == []


def test_the_native_writer_names_the_file_it_writes(tmp_path):
    # The executor's writer thread, given /dev/full: the error names the path it was told.
    src = torch.ones(1 << 16)
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as ei:
            plan = fastsoup._core.MergePlan(1, [src.numel()], [0], [0], [0], [2], [src.data_ptr()], [2], [0])
            plan.run([1.0], fds=[fd], fd_names=["/some/where/model-00001-of-00001.safetensors"])
    finally:
        os.close(fd)
    assert ei.value.filename == "/some/where/model-00001-of-00001.safetensors"


# ---------------------------------------------------------------------------------------------------
# 9, 10. Signals and the leftovers of killed runs


SLEEP_HOOK = """
open({marker!r}, "w").close()
time.sleep(60)
"""


def _wait_for(path, proc, timeout=TIMEOUT):
    t0 = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None:
            pytest.fail(f"the merge ended early: {proc.communicate(timeout=TIMEOUT)}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("the merge did not start")
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_sigterm_and_sighup_clean_up_as_sigint_does(tmp_path, sig):
    paths = make_inputs(tmp_path / "in", 2)
    out = tmp_path / "soup"
    marker = tmp_path / "started"
    p = cli_with_hook(["average", *paths, "-o", out, "--no-progress"], SLEEP_HOOK.format(marker=str(marker)), wait=False)
    _wait_for(marker, p)
    assert temp_leftovers(tmp_path) != []  # the temporary output exists while the merge runs
    p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the merge did not stop")
    assert p.returncode == 128 + sig, (p.returncode, err)
    assert "interrupted" in err or "terminated" in err
    assert not out.exists() and temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGBUS])
def test_the_next_run_reaps_what_a_killed_run_left(tmp_path, sig):
    paths = make_inputs(tmp_path / "in", 2)
    out = tmp_path / "soup.safetensors"
    marker = tmp_path / "started"
    p = cli_with_hook(["average", *paths, "-o", out, "--no-progress"], SLEEP_HOOK.format(marker=str(marker)), wait=False)
    _wait_for(marker, p)
    p.send_signal(sig)
    p.communicate(timeout=TIMEOUT)
    assert p.returncode == -sig
    left = temp_leftovers(tmp_path)
    assert len(left) == 1 and f"-{p.pid}-" in left[0]  # no handler runs for these
    r = cli("average", *paths, "-o", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert temp_leftovers(tmp_path) == []


def test_a_running_merge_keeps_its_temporary_files(tmp_path):
    # Reaping takes only what dead processes left: a merge in progress is not touched by another run.
    paths = make_inputs(tmp_path / "in", 2)
    out = tmp_path / "soup"
    marker = tmp_path / "started"
    p = cli_with_hook(["average", *paths, "-o", out, "--no-progress"], SLEEP_HOOK.format(marker=str(marker)), wait=False)
    try:
        _wait_for(marker, p)
        left = temp_leftovers(tmp_path)
        assert cli("average", *paths, "-o", tmp_path / "other", "--no-progress").returncode == 0
        r = cli("average", *paths, "-o", out, "--no-progress")  # same OUT: it installs first
        assert r.returncode == 0
        assert set(left) <= set(temp_leftovers(tmp_path))
    finally:
        p.kill()
        p.communicate(timeout=TIMEOUT)


def test_an_interrupt_while_the_old_output_is_removed_reports_the_truth(tmp_path):
    paths = make_inputs(tmp_path / "in", 3)
    out = tmp_path / "soup"
    assert cli("average", *paths[:2], "-o", out, "--shard-size", "200KB", "--no-progress").returncode == 0
    assert len([n for n in os.listdir(out) if n.startswith("model-")]) > 1
    # Ctrl-C lands while the replaced soup's shards are being deleted, after the new one is in place.
    code = textwrap.dedent(f"""
        import os, re, sys
        _unlink = os.unlink
        def unlink(path, *a, **k):
            if re.match(r"model-\\d{{5}}-of-\\d{{5}}\\.safetensors$", os.path.basename(os.fspath(path))):
                os.unlink = _unlink
                raise KeyboardInterrupt
            return _unlink(path, *a, **k)
        os.unlink = unlink
        from fastsoup import cli
        sys.exit(cli.main(["average", *{paths!r}, "-o", {str(out)!r}, "--overwrite", "--no-progress"]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert r.returncode == 130
    assert "installed" in r.stderr and "new output, complete" in r.stderr, r.stderr  # "interrupted" alone before
    got, want = fastsoup.open_checkpoint(str(out)), fastsoup.average(paths)
    assert all(torch.equal(got.tensor(n), want[n]) for n in want)  # OUT is the new soup
    assert any(".old-" in n for n in temp_leftovers(tmp_path))
    assert cli("average", *paths, "-o", tmp_path / "soup2", "--no-progress").returncode == 0  # a run beside it
    assert temp_leftovers(tmp_path) == []  # ... reaps the rest of the old one


# ---------------------------------------------------------------------------------------------------
# 1 (recipes). A recipe's sidecar record is part of its output


@pytest.fixture(scope="module")
def greedy_result(tmp_path_factory):
    sys.path.insert(0, HERE)
    import _tiny

    zoo = _tiny.build_zoo(tmp_path_factory.mktemp("zoo"))
    with _tiny.one_thread():
        return fastsoup.greedy_soup(zoo.paths[:3], zoo.model(), zoo.heldout)


def test_a_sidecar_never_replaces_a_file_fastsoup_did_not_write(tmp_path, greedy_result):
    out = tmp_path / "soup.safetensors"
    (tmp_path / "soup.json").write_text('{"my": "notes"}')  # NAME.json, the sidecar's name: the user's
    with pytest.raises(fastsoup.UnsafeOutputError, match="did not write"):
        greedy_result.save(out)
    assert (tmp_path / "soup.json").read_text() == '{"my": "notes"}' and not out.exists()  # nothing written
    (tmp_path / "soup.json").unlink()
    greedy_result.save(out)
    assert json.loads((tmp_path / "soup.json").read_text())["recipe"] == "greedy_soup"
    with pytest.raises(fastsoup.OutputExistsError):
        greedy_result.save(out)
    greedy_result.save(out, overwrite=True)  # its own record: replaced with the soup
    assert temp_leftovers(tmp_path) == []


def test_a_folder_soup_carries_its_sidecar_in_the_install(tmp_path, greedy_result):
    out = tmp_path / "soup"
    greedy_result.save(out)
    manifest = json.loads((out / ".fastsoup.json").read_text())
    assert manifest["files"]["soup.json"] == os.path.getsize(out / "soup.json")  # written before the install
    greedy_result.save(out, overwrite=True)  # a folder of fastsoup's own, sidecar included: replaceable
    assert json.loads((out / "soup.json").read_text())["indices"] == greedy_result.indices
