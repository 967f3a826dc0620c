"""The search caches as hints (DESIGN §5): checkpoints edited in place are evaluated again (file
identity, and ``verify="full"``), every journal record and logits file carries a checksum and a
damaged one is recomputed (one warning) so the search equals a cache-free one bit for bit, caches of
an earlier fastsoup are not trusted, and every temporary file of the search, the report and the
learned soup follows the one naming rule (``fastsoup/io/_tempfiles.py``): locked while written,
removed on failure (KeyboardInterrupt included) and reaped by the next run once its process is gone
(a search killed while preparing the held-out set)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fastsoup
from fastsoup import cli
from fastsoup.io import _tempfiles
from fastsoup.search.cache import SAMPLE_BYTES, SAMPLES
from conftest import bits_equal

import _tiny

TESTS = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 300  # seconds for one subprocess: a hang fails the test instead of blocking CI
WIDE = 2048  # hidden units: fc1.weight is 128 KiB, larger than what the sampled fingerprint hashes whole


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with _tiny.one_thread():
        yield


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return _tiny.build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def plain(zoo):
    """The search without a cache: what every cached search must equal."""
    return fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout)


def decisions(result) -> list:
    return [(h["step"], h["index"], h["accepted"]) for h in result.history]


def assert_same_search(result, ref) -> None:
    """Same decisions, scores and kept ingredients, and the same soup bit for bit."""
    assert decisions(result) == decisions(ref)
    assert (result.indices, result.score, result.individual_scores) == (ref.indices, ref.score, ref.individual_scores)
    a, b = result.state_dict(), ref.state_dict()
    assert list(a) == list(b) and all(bits_equal(a[k], b[k]) for k in a)


def recording(fn):
    """fn()'s result and the messages of the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


def temporaries(folder) -> list[str]:
    """Every entry under ``folder`` that looks like a temporary file, by any naming of any version
    (a cache's own files are never hidden)."""
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, dirs, files in os.walk(folder)
                  for n in dirs + files if ".tmp" in n or n.startswith("."))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=TIMEOUT)
    return p.pid


# --- 11: checkpoints edited in place ---------------------------------------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A zoo of 4 fine-tunes of an MLP whose fc1.weight (128 KiB) is fingerprinted by samples."""
    folder = tmp_path_factory.mktemp("wide")
    from safetensors.torch import save_file

    with _tiny.one_thread():
        torch.manual_seed(0)
        base = _tiny.MLP(hidden=WIDE)
        xp, yp = _tiny.make_data(600, 1)
        _tiny.train(base, xp, yp, lr=0.05, seed=0, epochs=1)
        init = _tiny.clone_state(base)
        xt, yt = _tiny.make_data(400, 2)
        sds, paths = [], []
        for i, lr in enumerate([0.1, 0.05, 0.2, 0.02]):
            m = _tiny.MLP(hidden=WIDE)
            m.load_state_dict(init)
            _tiny.train(m, xt, yt, lr=lr, seed=i, epochs=1)
            sds.append(_tiny.clone_state(m))
            paths.append(os.path.join(folder, f"wide{i}.safetensors"))
            save_file(sds[-1], paths[-1])
    heldout = _tiny.batches(*_tiny.make_data(_tiny.HELDOUT_SIZE, 3))
    return init, sds, paths, heldout


def wide_model(init) -> torch.nn.Module:
    m = _tiny.MLP(hidden=WIDE)
    m.load_state_dict(init)
    return m


def unsampled(nbytes: int) -> list[tuple[int, int]]:
    """Byte ranges (4-byte aligned) of a tensor of ``nbytes`` that the sampled fingerprint never reads."""
    span = nbytes - SAMPLE_BYTES
    starts = [span * i // (SAMPLES - 1) for i in range(SAMPLES)]
    out = []
    for a, b in zip(starts, starts[1:]):
        lo, hi = -(-(a + SAMPLE_BYTES) // 4) * 4, b // 4 * 4
        if hi > lo:
            out.append((lo, hi))
    return out


def garbage(n: int, seed: int) -> torch.Tensor:
    return 30.0 * torch.randn(n, generator=torch.Generator().manual_seed(seed))


def edit_file_in_place(path: str, name: str = "fc1.weight") -> None:
    """Overwrites every unsampled byte of one tensor with large values (same file, same size)."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin, end = json.loads(f.read(n))[name]["data_offsets"]
        for k, (lo, hi) in enumerate(unsampled(end - begin)):
            f.seek(8 + n + begin + lo)
            f.write(garbage((hi - lo) // 4, k).numpy().tobytes())


def edit_in_memory(sd: dict, name: str = "fc1.weight") -> None:
    flat = sd[name].view(-1)
    for k, (lo, hi) in enumerate(unsampled(flat.numel() * 4)):
        flat[lo // 4:hi // 4] = garbage((hi - lo) // 4, k)


@pytest.mark.slow  # whichever case runs first pays ~3.5 s
@pytest.mark.parametrize("mtime", ["changed", "set back"])
def test_a_checkpoint_edited_in_place_is_evaluated_again(wide, tmp_path, mtime):
    init, _, paths, heldout = wide
    paths = [shutil.copy(p, tmp_path / os.path.basename(p)) for p in paths]
    cache = tmp_path / "cache"
    first = fastsoup.greedy_soup(paths, wide_model(init), heldout, cache_dir=cache)
    best = first.indices[0]
    st = os.stat(paths[best])
    edit_file_in_place(paths[best])
    if mtime == "set back":  # as rsync --inplace --times does: only the change time tells
        os.utime(paths[best], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(paths[best]).st_size == st.st_size
    fresh = fastsoup.greedy_soup(paths, wide_model(init), heldout)
    assert fresh.individual_scores[best] < first.individual_scores[best] - 0.1  # the edit matters
    again = fastsoup.greedy_soup(paths, wide_model(init), heldout, cache_dir=cache)
    assert_same_search(again, fresh)
    assert again.stats.evaluations >= 1


def test_verify_full_sees_an_in_memory_ingredient_changed_between_runs(wide, tmp_path):
    init, sds, _, heldout = wide
    sds = [_tiny.clone_state(sd) for sd in sds]
    cache = tmp_path / "cache"
    first = fastsoup.greedy_soup(sds, wide_model(init), heldout, cache_dir=cache, verify="full")
    unchanged = fastsoup.greedy_soup(sds, wide_model(init), heldout, cache_dir=cache, verify="full")
    assert unchanged.stats.evaluations == 0
    best = first.indices[0]
    edit_in_memory(sds[best])  # the sampled bytes are unchanged
    fresh = fastsoup.greedy_soup(sds, wide_model(init), heldout)
    assert fresh.individual_scores[best] < first.individual_scores[best] - 0.1
    again = fastsoup.greedy_soup(sds, wide_model(init), heldout, cache_dir=cache, verify="full")
    assert_same_search(again, fresh)


def test_verify_full_keys_by_content_so_touched_files_keep_their_entries(wide, tmp_path):
    init, _, paths, heldout = wide
    paths = [shutil.copy(p, tmp_path / os.path.basename(p)) for p in paths]
    cache = tmp_path / "cache"
    first = fastsoup.greedy_soup(paths, wide_model(init), heldout, cache_dir=cache, verify="full")
    for p in paths:
        os.utime(p, ns=(1, 10**18))
    again = fastsoup.greedy_soup(paths, wide_model(init), heldout, cache_dir=cache, verify="full")
    assert again.stats.evaluations == 0 and decisions(again) == decisions(first)
    # the sampled fingerprint keys by identity: the touched files are other entries
    sampled = fastsoup.greedy_soup(paths, wide_model(init), heldout, cache_dir=cache)
    assert sampled.stats.evaluations > 0 and decisions(sampled) == decisions(first)


def test_a_bad_verify_is_refused(zoo, tmp_path):
    with pytest.raises(ValueError, match="verify"):
        fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=tmp_path, verify="fast")


# --- 12: checksums, damaged entries --------------------------------------------------------------------


def _lines(path) -> list[bytes]:
    return open(path, "rb").read().splitlines(True)


def flip_accepted(cache):
    path = cache / "journal.jsonl"
    lines = _lines(path)
    i = next(i for i, line in enumerate(lines) if b'"accepted": false' in line)
    lines[i] = lines[i].replace(b'"accepted": false', b'"accepted": true')
    path.write_bytes(b"".join(lines))


def non_utf8_byte(cache):
    path = cache / "journal.jsonl"
    lines = _lines(path)
    lines[1] = lines[1][:20] + b"\xff" + lines[1][21:]
    path.write_bytes(b"".join(lines))


def null_line(cache):
    path = cache / "journal.jsonl"
    path.write_bytes(b"null\n" + path.read_bytes())


def missing_field(cache):
    path = cache / "journal.jsonl"
    lines = _lines(path)
    r = json.loads(lines[0])
    del r["accepted"]
    lines[0] = (json.dumps(r) + "\n").encode()
    path.write_bytes(b"".join(lines))


def random_logits(cache):
    """Random bytes over the data of every logits file (headers intact: still valid safetensors)."""
    g = torch.Generator().manual_seed(0)
    for e in sorted((cache / "logits").iterdir()):
        raw = bytearray(e.read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        data = torch.randint(0, 256, (len(raw) - 8 - n,), dtype=torch.uint8, generator=g)
        raw[8 + n:] = data.numpy().tobytes()
        e.write_bytes(bytes(raw))


def swapped_logits(cache):
    """Every logits file replaced by another one (each intact, under another key)."""
    entries = sorted((cache / "logits").iterdir())
    contents = [e.read_bytes() for e in entries]
    for e, c in zip(entries, contents[1:] + contents[:1]):
        e.write_bytes(c)


def garbage_manifest(cache):
    (cache / "manifest.json").write_bytes(b"\x00\xffnot a manifest")


DAMAGE = [flip_accepted, non_utf8_byte, null_line, missing_field, random_logits, swapped_logits, garbage_manifest]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__ for d in DAMAGE])
def test_a_damaged_cache_is_recomputed_with_one_warning_and_equals_no_cache(zoo, plain, tmp_path, damage):
    cache = tmp_path / "cache"
    first = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    assert_same_search(first, plain)
    damage(cache)
    again, messages = recording(lambda: fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache))
    assert_same_search(again, plain)
    assert len([m for m in messages if str(cache) in m]) == 1, messages
    # healed: the next run trusts what this one rewrote, evaluates nothing and warns of nothing
    third, messages = recording(lambda: fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache))
    assert_same_search(third, plain)
    assert third.stats.evaluations == 0 and not [m for m in messages if str(cache) in m], messages


@pytest.mark.parametrize("field,value", [("accepted", "yes"), ("step", "2"), ("batches", None), ("index", True),
                                         ("accepted", None), ("score", [1])])
def test_a_record_with_a_valid_checksum_and_a_bad_field_is_not_trusted(zoo, plain, tmp_path, field, value):
    from fastsoup.search.cache import seal

    cache = tmp_path / "cache"
    fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    path = cache / "journal.jsonl"
    lines = _lines(path)
    r = json.loads(lines[2])
    if value is None:
        del r[field]
    else:
        r[field] = value
    lines[2] = (json.dumps(seal(r)) + "\n").encode()
    path.write_bytes(b"".join(lines))
    again, messages = recording(lambda: fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache))
    assert_same_search(again, plain)
    assert len([m for m in messages if "journal.jsonl" in m]) == 1, messages


def test_every_record_and_file_of_the_cache_carries_a_checksum(zoo, tmp_path):
    from fastsoup.search.cache import record_checksum

    cache = tmp_path / "cache"
    fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    records = [json.loads(line) for line in _lines(cache / "journal.jsonl")]
    assert records and all(r["checksum"] == record_checksum(r) for r in records)
    manifest = json.loads((cache / "manifest.json").read_text())
    entries = {k: v for k, v in manifest.items() if k != "format"}
    assert set(entries) == {"model", "data:heldout"}
    assert all(v["checksum"] == record_checksum(v) for v in entries.values())
    for e in (cache / "logits").iterdir():
        meta = fastsoup.open_checkpoint(str(e)).metadata
        assert meta["key"] == e.name[: -len(".safetensors")] and len(meta["checksum"]) == 32


def test_a_cache_of_an_earlier_fastsoup_is_not_trusted(zoo, plain, tmp_path):
    """A cache as fastsoup wrote it before checksums: no format, no checksums anywhere."""
    from safetensors.torch import save_file

    cache = tmp_path / "cache"
    fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    old = {k: {"fingerprint": v["fingerprint"], "written": v["written"]} for k, v in manifest.items() if k != "format"}
    (cache / "manifest.json").write_text(json.dumps(old))
    records = [json.loads(line) for line in _lines(cache / "journal.jsonl")]
    for r in records:
        del r["checksum"]
        r["accepted"] = not r["accepted"]  # whatever they say, they are not used
    (cache / "journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for e in (cache / "logits").iterdir():
        save_file({"logits": torch.zeros(_tiny.HELDOUT_SIZE, _tiny.CLASSES)}, str(e))
    again, messages = recording(lambda: fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache))
    assert_same_search(again, plain)
    ours = [m for m in messages if str(cache) in m]
    assert len(ours) == 1 and "earlier fastsoup" in ours[0], messages
    assert (cache / "journal-unchecked.jsonl").exists()
    third, messages = recording(lambda: fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache))
    assert third.stats.evaluations == 0 and not [m for m in messages if str(cache) in m], messages
    assert_same_search(third, plain)


def edit_score(path):
    d = json.loads(path.read_text())
    d["score"] = 0.999
    path.write_text(json.dumps(d))


def non_utf8(path):
    path.write_bytes(b"\xff" + path.read_bytes()[1:])


def null(path):
    path.write_text("null")


@pytest.mark.parametrize("damage", [edit_score, non_utf8, null], ids=["edited", "non-utf8", "null"])
def test_a_damaged_learned_result_is_trained_again(zoo, tmp_path, damage):
    cache = tmp_path / "cache"
    run = lambda: fastsoup.learned_soup(zoo.paths[:3], zoo.model(), zoo.heldout, steps=3, cache_dir=cache,  # noqa: E731
                                        progress=False)
    first = run()
    (entry,) = cache.glob("learned-*.json")
    damage(entry)
    again, messages = recording(run)
    assert [m for m in messages if str(entry) in m], messages
    assert (again.score, again.loss, again.losses) == (first.score, first.loss, first.losses)
    assert torch.equal(again.coefficients, first.coefficients)
    third, messages = recording(run)  # rewritten: used again, no warning
    assert third.score == first.score and not [m for m in messages if str(entry) in m]


# --- 9: temporary files -------------------------------------------------------------------------------


KILLED_CHILD = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    import fastsoup, _tiny
    from safetensors.torch import load_file

    cache, init, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
    model = _tiny.MLP()
    model.load_state_dict(load_file(init))
    x, y = _tiny.make_data(_tiny.HELDOUT_SIZE, 3)

    def loader():
        for i, batch in enumerate(_tiny.batches(x, y)):
            if i == 3:  # midway through preparing the held-out set: a kill no handler sees
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    fastsoup.greedy_soup(paths, model, loader(), cache_dir=cache)
''')


def test_a_search_killed_while_preparing_the_heldout_set_is_reaped_by_the_next_run(zoo, plain, tmp_path):
    from safetensors.torch import save_file

    cache, init, script = tmp_path / "cache", tmp_path / "init.safetensors", tmp_path / "child.py"
    save_file(zoo.init, str(init))
    script.write_text(KILLED_CHILD.format(tests=TESTS))
    child = subprocess.run([sys.executable, str(script), str(cache), str(init), *zoo.paths], timeout=TIMEOUT,
                           capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    left = temporaries(cache / "data")
    assert left and all(os.path.getsize(cache / "data" / n) > 0 for n in left if n.endswith(".bin"))
    result = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    assert_same_search(result, plain)
    assert temporaries(cache) == []
    assert sorted(os.listdir(cache / "data")) == ["heldout.bin", "heldout.json"]


def test_an_interrupt_while_preparing_the_heldout_set_leaves_no_temporary_file(zoo, tmp_path):
    def loader():
        for i, batch in enumerate(zoo.heldout):
            if i == 3:
                raise KeyboardInterrupt
            yield batch

    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        fastsoup.greedy_soup(zoo.paths, zoo.model(), loader(), cache_dir=cache)
    assert temporaries(cache) == []


def _report(zoo, tmp_path, cache):
    from fastsoup.report import run_report

    return run_report(zoo.paths, zoo.model(), zoo.heldout, {}, out=str(tmp_path / "out.safetensors"), cache_dir=str(cache),
                      overwrite=True, progress=False)


def _learned(zoo, cache):
    return fastsoup.learned_soup(zoo.paths[:3], zoo.model(), zoo.heldout, steps=2, cache_dir=cache, progress=False)


def watch_renames(monkeypatch, on_rename):
    """Calls ``on_rename(src, dst)`` before every os.replace / os.rename."""
    real = {"replace": os.replace, "rename": os.rename}

    def wrap(which):
        def f(src, dst, *a, **k):
            on_rename(os.fspath(src), os.fspath(dst))
            return real[which](src, dst, *a, **k)
        return f

    monkeypatch.setattr(os, "replace", wrap("replace"))
    monkeypatch.setattr(os, "rename", wrap("rename"))


def test_every_temporary_file_is_named_by_the_rule_and_locked_while_written(zoo, tmp_path, monkeypatch):
    cache, lcache = tmp_path / "cache", tmp_path / "lcache"
    seen = []

    def check(src, dst):
        if str(cache) in dst or str(lcache) in dst:
            seen.append(os.path.basename(dst))
            parts = _tempfiles.parse(os.path.basename(src))
            assert parts is not None and parts["pid"] == os.getpid(), src
            assert _tempfiles._locked(src), f"{src} is not locked while it is written"

    watch_renames(monkeypatch, check)
    _report(zoo, tmp_path, cache)
    _learned(zoo, lcache)
    kinds = {n.rsplit(".", 1)[-1] if not n.startswith("learned-") else "learned" for n in seen}
    assert {"json", "safetensors", "bin", "jsonl", "learned"} <= kinds, seen  # manifest/store, logits, store, results


INTERRUPTED = {
    "manifest": lambda dst: dst.endswith("manifest.json"),
    "heldout store": lambda dst: dst.endswith("heldout.bin"),
    "results": lambda dst: dst.endswith("results.jsonl"),
    "learned result": lambda dst: os.path.basename(dst).startswith("learned-"),
}


@pytest.mark.parametrize("kind", list(INTERRUPTED))
def test_an_interrupt_while_writing_leaves_no_temporary_file(zoo, plain, tmp_path, monkeypatch, kind):
    cache = tmp_path / "cache"

    def interrupt(src, dst):
        if INTERRUPTED[kind](dst):
            raise KeyboardInterrupt

    watch_renames(monkeypatch, interrupt)
    with pytest.raises(KeyboardInterrupt):
        if kind == "learned result":
            _learned(zoo, cache)
        else:
            _report(zoo, tmp_path, cache)
    monkeypatch.undo()
    assert temporaries(tmp_path) == []
    if kind != "learned result":  # and the cache still works
        assert_same_search(fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache), plain)


def test_temporary_files_of_dead_processes_are_reaped_and_live_ones_kept(zoo, tmp_path):
    cache, lcache = tmp_path / "cache", tmp_path / "lcache"
    dead, live = dead_pid(), os.getppid()
    (cache / "logits").mkdir(parents=True)
    (cache / "data").mkdir()
    lcache.mkdir()
    stale = [cache / f".manifest.json.tmp-{dead}-0123abcd", cache / f".results.jsonl.tmp-{dead}-0123abcd",
             cache / "logits" / f".00ff.safetensors.tmp-{dead}-0123abcd",
             cache / "data" / f".heldout.tmp-{dead}-0123abcd.bin", cache / "data" / f".heldout.tmp-{dead}-0123abcd.json",
             cache / "data" / f"heldout.tmp-{dead}-7f3a9c.bin",  # as an earlier fastsoup named it
             lcache / f".learned-00ff.json.tmp-{dead}-0123abcd"]
    kept = [cache / "data" / f".heldout.tmp-{live}-0123abcd.bin", lcache / f".learned-00ff.json.tmp-{live}-0123abcd"]
    for p in stale + kept:
        p.write_bytes(b"x" * 100)
    _report(zoo, tmp_path, cache)
    _learned(zoo, lcache)
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)


# --- the CLI ------------------------------------------------------------------------------------------


CLI_MODULE = textwrap.dedent('''
    import sys
    sys.path.insert(0, {tests!r})
    import _tiny
    from safetensors.torch import load_file

    def net():
        m = _tiny.MLP()
        m.load_state_dict(load_file({init!r}))
        return m

    def heldout():
        return _tiny.batches(*_tiny.make_data(_tiny.HELDOUT_SIZE, 3))
''')


@pytest.fixture
def cli_module(zoo, tmp_path):
    from safetensors.torch import save_file

    init = tmp_path / "init.safetensors"
    save_file(zoo.init, str(init))
    mod = tmp_path / "climod.py"
    mod.write_text(CLI_MODULE.format(tests=TESTS, init=str(init)))
    return str(mod)


def test_cli_verify_cache(zoo, tmp_path, cli_module, capsys, monkeypatch):
    cache = tmp_path / "cache"
    argv = ["greedy", *zoo.paths, "--model", f"{cli_module}:net", "--heldout", f"{cli_module}:heldout",
            "-o", str(tmp_path / "g.safetensors"), "--cache", str(cache), "--verify-cache", "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    first = capsys.readouterr().out
    assert cli.main(argv + ["--overwrite"]) == 0
    again = capsys.readouterr().out
    assert " 0 evaluations" in again and again.splitlines()[:-1] == first.splitlines()[:-1]

    from fastsoup.recipes import learned as L

    largv = ["learned", *zoo.paths[:3], "--model", f"{cli_module}:net", "--heldout", f"{cli_module}:heldout",
             "-o", str(tmp_path / "l.safetensors"), "--steps", "2", "--cache", str(cache), "--verify-cache",
             "--no-progress"]
    assert cli.main(largv) == 0, capsys.readouterr().err
    capsys.readouterr()

    def boom(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(L, "dots", boom)
    assert cli.main(largv + ["--overwrite"]) == 0, capsys.readouterr().err
