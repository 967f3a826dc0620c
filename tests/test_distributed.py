"""torch.distributed: 2 ranks with gloo on this CPU machine, launched by torchrun from the test
(``tests/_dist_worker.py`` runs every scenario in one process group), against one process: sharded
merges byte for byte (file and in-memory inputs, dtype conversion, single-file output, ``out=None``),
a failure on one rank (before and during the writes) failing every rank and leaving no output, an
existing output, greedy soup (decisions, scores, history, the saved soup, a cache and journal written
once, a rerun from the cache), a callable metric, the learned soup (to a stated tolerance), and the
CLI under torchrun (``average`` and ``greedy``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("this torch has no torch.distributed with gloo", allow_module_level=True)

import fastsoup  # noqa: E402
from fastsoup import cli  # noqa: E402
from fastsoup.distributed import launched  # noqa: E402
from fastsoup.distributed.output import assign  # noqa: E402

import _tiny  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 180  # seconds for one torchrun launch: a hang fails the test instead of hanging CI
SCENARIOS = ["merge_files", "merge_bf16", "merge_memory", "merge_single", "merge_ties", "merge_dare", "merge_none", "fail_ready", "fail_work",
             "exists", "foreign", "local", "greedy", "greedy_rerun", "greedy_metric", "learned"]


def torchrun(args, *, cwd=None):
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS`` (a free port of its own);
    kills the whole launch on a timeout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate(timeout=TIMEOUT)
        pytest.fail(f"torchrun hung for {TIMEOUT} s: {cmd}\n{out}\n{err}")
    return p.returncode, out, err


def files_of(path) -> dict:
    """name -> bytes of a file, or of every file in a folder."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return {os.path.basename(path): open(path, "rb").read()}
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


def leftovers(folder) -> list:
    """Temporary files or folders of an output (hidden names of the writer) left in ``folder``."""
    return [n for n in os.listdir(folder) if ".tmp-" in n or ".old-" in n]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with _tiny.one_thread():
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    zoo = _tiny.build_zoo(root)
    from safetensors.torch import save_file

    save_file(zoo.init, str(root / "init.safetensors"))
    data = open(zoo.paths[3], "rb").read()
    (root / "corrupt.safetensors").write_bytes(data[: len(data) - 100])
    work = root / "work"
    work.mkdir(parents=True)
    fastsoup.save({"old": torch.zeros(3)}, work / "existing", shard_size="1KB")  # an earlier soup: replaceable
    (work / "foreign").mkdir()
    (work / "foreign" / "old.txt").write_text("old")  # the user's own file: never deleted
    cfg = {"paths": zoo.paths, "init": str(root / "init.safetensors"), "work": str(work),
           "corrupt": str(root / "corrupt.safetensors"), "existing": str(work / "existing"),
           "foreign": str(work / "foreign"), "scenarios": SCENARIOS}
    (root / "cfg.json").write_text(json.dumps(cfg))
    rc, out, err = torchrun([os.path.join(HERE, "_dist_worker.py"), root / "cfg.json"])
    assert rc == 0, err[-5000:]
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1)]
    return zoo, cfg, ranks, root


def ok(ranks, name) -> list:
    for r, res in enumerate(ranks):
        assert res[name]["ok"], f"rank {r}: {res[name].get('traceback')}"
    return [res[name] for res in ranks]


def same_manifest(have: dict, want: dict) -> bool:
    """Pops the manifests of two folders' files (name -> bytes) and compares them but for the size of
    the sidecar soup.json (its timings differ from run to run)."""
    a, b = (json.loads(d.pop(".fastsoup.json")) for d in (have, want))
    a["files"].pop("soup.json", None)
    b["files"].pop("soup.json", None)
    return a == b


def single(tmp_path, name):
    return str(tmp_path / name)


# --- sharded merges --------------------------------------------------------------------------------------


@pytest.mark.slow  # the module's torchrun launches (the setup fixture)
@pytest.mark.parametrize("name", ["merge_files", "merge_bf16", "merge_memory", "merge_single", "merge_ties",
                                  "merge_dare"])
def test_sharded_merge_is_bit_identical_to_one_process(setup, tmp_path, name):
    zoo, cfg, ranks, _ = setup
    got = ok(ranks, name)
    assert got[0]["out"] == got[1]["out"]
    paths = zoo.paths
    if name == "merge_files":
        before = fastsoup._core.counters()["mapped_bytes_read"]
        ref = fastsoup.average(paths, [1, 2, 3, 4, 5, 6, 7, 8], out=single(tmp_path, "ref"), shard_size="1KB")
        read = fastsoup._core.counters()["mapped_bytes_read"] - before
        assert got[0]["read"] + got[1]["read"] == read  # each rank reads only its shards' part of every input
        assert 0 < got[0]["read"] < read and 0 < got[1]["read"] < read
    elif name == "merge_bf16":
        ref = fastsoup.weighted_sum(paths[:3], [0.5, -1.25, 2.0], out=single(tmp_path, "ref"), shard_size="1KB",
                                    dtype="bf16")
    elif name == "merge_ties":
        ref = fastsoup.merge(paths[1:5], "ties", base=cfg["init"], density=0.4, out=single(tmp_path, "ref"),
                             shard_size="1KB")
    elif name == "merge_dare":
        ref = fastsoup.merge(paths[1:4], "dare_ties", base=cfg["init"], density=0.5, seed=9,
                             out=single(tmp_path, "ref"), shard_size="1KB")
    elif name == "merge_memory":
        from safetensors.torch import load_file

        ref = fastsoup.average([load_file(p) for p in paths[:4]], out=single(tmp_path, "ref"), shard_size="600B")
    else:
        ref = fastsoup.average(paths, out=single(tmp_path, "ref.safetensors"))
    want, have = files_of(ref), files_of(got[0]["out"])
    if name == "merge_single":  # one file, written by rank 0 alone
        want, have = list(want.values()), list(have.values())
        assert have == want
        return
    if name != "merge_single":
        assert len([n for n in want if n.endswith(".safetensors")]) >= 3  # several shards, on both ranks
        assert "model.safetensors.index.json" in have
    assert list(have) == list(want)
    for n in want:
        assert have[n] == want[n], n
    assert leftovers(cfg["work"]) == []


@pytest.mark.slow  # the module's torchrun launches (the setup fixture)
def test_in_memory_output_is_computed_on_every_rank(setup):
    zoo, _, ranks, _ = setup
    got = ok(ranks, "merge_none")
    from _dist_worker import digest

    assert got[0]["digest"] == got[1]["digest"] == json.loads(json.dumps(digest(fastsoup.average(zoo.paths[:5]))))


@pytest.mark.slow  # the module's torchrun launches (the setup fixture)
@pytest.mark.parametrize("name", ["fail_ready", "fail_work"])
def test_a_failing_rank_fails_every_rank_and_leaves_no_output(setup, name):
    _, cfg, ranks, _ = setup
    r0, r1 = ranks[0][name], ranks[1][name]
    assert not r0["ok"] and not r1["ok"]
    if name == "fail_ready":  # the damaged file only rank 1 reads: its own error there, named on rank 0
        assert r1["type"] == "CheckpointError" and "corrupt.safetensors" in r1["message"]
    else:
        assert r1["type"] == "RuntimeError" and r1["message"] == "injected failure on rank 1"
    assert r0["distributed"] and r0["message"].startswith("rank 1 failed: " + r1["type"])
    assert r1["message"] in r0["message"]
    assert not os.path.exists(os.path.join(cfg["work"], name))
    assert leftovers(cfg["work"]) == []


@pytest.mark.slow  # the module's torchrun launches (the setup fixture)
def test_existing_output_is_refused_then_replaced(setup, tmp_path):
    zoo, cfg, ranks, _ = setup
    r0, r1 = ok(ranks, "exists")
    assert r0["first"][0] == "OutputExistsError" and "overwrite" in r0["first"][1]
    assert r1["first"][0] == "DistributedError" and "rank 0 failed: OutputExistsError" in r1["first"][1]
    ref = fastsoup.average(zoo.paths[:2], out=single(tmp_path, "ref"), shard_size="1KB")
    assert files_of(cfg["existing"]) == files_of(ref)  # the earlier soup was replaced as a whole


@pytest.mark.slow  # the module's torchrun launches (the setup fixture)
def test_overwrite_never_deletes_a_users_folder(setup):
    _, cfg, ranks, _ = setup
    r0, r1 = ok(ranks, "foreign")
    assert r0["error"][0] == "UnsafeOutputError" and "'old.txt'" in r0["error"][1]
    assert r1["error"][0] == "DistributedError" and "rank 0 failed: UnsafeOutputError" in r1["error"][1]
    assert os.listdir(cfg["foreign"]) == ["old.txt"] and leftovers(cfg["work"]) == []


@pytest.mark.slow  # the module's torchrun launches (the setup fixture)
def test_local_runs_on_one_rank(setup):
    assert [r["exists"] for r in ok(setup[2], "local")] == [True, True]


def test_shards_are_balanced_by_bytes():
    assert assign([100, 10, 10, 10, 60, 30], 2) == [0, 1, 0, 1, 1, 1]  # 100+10 | 60+30+10+10: 110 each
    assert assign([5, 5, 5, 5], 3) == [0, 1, 2, 0]
    assert assign([7], 4) == [0]
    loads = [0, 0, 0]
    sizes = [900, 400, 400, 300, 300, 250, 200, 100]
    for s, r in zip(sizes, assign(sizes, 3)):
        loads[r] += s
    assert max(loads) - min(loads) <= 100


def test_launch_detection_reads_the_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not launched()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched()
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched()
    assert fastsoup.distributed.current() is None  # torch.distributed is not initialized here


class FakeDist:
    """Enough of torch.distributed for Comm's choice of group (no GPU here to run nccl for real)."""

    def __init__(self, backend):
        self.backend, self.created = backend, []

    def get_rank(self):
        return 1

    def get_world_size(self):
        return 4

    def get_backend(self, group=None):
        return self.backend

    def new_group(self, backend=None, timeout=None):
        self.created.append((backend, timeout.total_seconds()))
        return "side group"


@pytest.mark.parametrize("backend", ["gloo", "nccl", "cpu:gloo,cuda:nccl"])
def test_fastsoup_collectives_go_through_gloo(backend, monkeypatch):
    from fastsoup.distributed import Comm

    monkeypatch.setenv("FASTSOUP_DIST_TIMEOUT", "123")
    fake = FakeDist(backend)
    comm = Comm(fake)
    assert (comm.rank, comm.world) == (1, 4)
    if backend == "nccl":  # a gloo side group for CPU objects, created once, with fastsoup's timeout
        assert comm.group == "side group" and fake.created == [("gloo", 123.0)]
    else:  # the default group carries CPU tensors itself
        assert comm.group is None and fake.created == []
    assert comm.gloo == (backend != "cpu:gloo,cuda:nccl")  # monitored_barrier needs a pure gloo group


# --- greedy and learned soups ------------------------------------------------------------------------------


def heldout():
    return _tiny.batches(*_tiny.make_data(_tiny.HELDOUT_SIZE, 3))


def history(result) -> list:
    return [{k: h[k] for k in ("step", "index", "name", "score", "accepted", "batches", "of", "source")}
            for h in result.history]


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory):
    zoo = setup[0]
    cache = tmp_path_factory.mktemp("one_process_cache")
    # The ranks run their batches in the set's order (hardest-first ordering is single-process only),
    # so the reference, whose batch counts are compared, runs them in that order too.
    from fastsoup.recipes.greedy import run_greedy
    from fastsoup.search import Search

    r = run_greedy(Search(zoo.paths, zoo.model(), heldout(), cache_dir=cache), reorder="none")
    return r, cache


@pytest.mark.slow  # the module's torchrun launches (the setup fixture)
def test_greedy_two_ranks_equal_one_process(setup, one_process, tmp_path):
    zoo, cfg, ranks, _ = setup
    ref, _ = one_process
    for got in ok(ranks, "greedy"):
        assert got["indices"] == ref.indices and got["score"] == ref.score
        assert got["individual"] == ref.individual_scores
        assert got["history"] == history(ref)  # batches too: early rejection stops where one process stops
    assert any(h["batches"] < h["of"] for h in history(ref))  # early rejection was exercised
    want = files_of(ref.save(tmp_path / "ref", shard_size="1KB"))
    have = files_of(os.path.join(cfg["work"], "greedy_out"))
    assert json.loads(have.pop("soup.json"))["indices"] == ref.indices  # the sidecar, from rank 0
    want.pop("soup.json")
    assert same_manifest(have, want)
    assert have == want


@pytest.mark.slow  # the module's torchrun launches (the setup fixture)
def test_greedy_cache_and_journal_are_written_once(setup, one_process):
    zoo, cfg, ranks, _ = setup
    _, ref_cache = one_process
    cache = os.path.join(cfg["work"], "cache")
    lines = open(os.path.join(cache, "journal.jsonl")).read().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(zoo.paths) - 1 == len({r["step"] for r in records})  # one line per decision
    assert sorted(os.listdir(os.path.join(cache, "logits"))) == sorted(os.listdir(os.path.join(ref_cache, "logits")))
    first = ok(ranks, "greedy")
    for got in ok(ranks, "greedy_rerun"):  # everything from the cache and the journal
        assert got["evaluations"] == 0 and got["cached"] > 0
        assert [h["source"] for h in got["history"][1:]] == ["journal"] * (len(zoo.paths) - 1)
        assert [(h["index"], h["accepted"], h["score"]) for h in got["history"]] == \
               [(h["index"], h["accepted"], h["score"]) for h in first[0]["history"]]


@pytest.mark.slow  # the module's torchrun launches (the setup fixture)
def test_greedy_with_a_callable_metric(setup):
    zoo, _, ranks, _ = setup
    from _dist_worker import accuracy_metric

    ref = fastsoup.greedy_soup(zoo.paths, zoo.model(), heldout(), metric=accuracy_metric, strict=True)
    for got in ok(ranks, "greedy_metric"):
        assert got["indices"] == ref.indices and got["score"] == ref.score and got["history"] == history(ref)


@pytest.mark.slow  # the module's torchrun launches (the setup fixture)
def test_learned_soup_two_ranks_match_one_process(setup):
    zoo, _, ranks, _ = setup
    ref = fastsoup.learned_soup(zoo.paths[:4], zoo.model(), heldout(), steps=6, seed=1)
    r0, r1 = ok(ranks, "learned")
    assert r0 == r1  # every rank took the same steps
    # Each rank computes its rows' share of a batch's gradient; the shares are summed: the same
    # mathematics, other float rounding (observed here: coefficients equal, loss and beta ~1e-7 relative).
    assert r0["coefficients"] == pytest.approx(ref.coefficients.tolist(), rel=1e-5, abs=1e-6)
    assert r0["losses"] == pytest.approx(ref.losses, rel=1e-5)
    assert r0["beta"] == pytest.approx(ref.beta, rel=1e-5)
    assert r0["score"] == ref.score


# --- the CLI under torchrun --------------------------------------------------------------------------------


@pytest.mark.slow  # the module's torchrun launches (the setup fixture)
def test_cli_average_under_torchrun(setup, tmp_path):
    zoo = setup[0]
    out = tmp_path / "cli_soup"
    rc, _, err = torchrun(["-m", "fastsoup", "average", *zoo.paths, "-o", out, "--shard-size", "1KB",
                           "--dtype", "fp16"])
    assert rc == 0, err[-3000:]
    assert err.count("wrote ") == 1  # rank 0 reports
    assert cli.main(["average", *zoo.paths, "-o", str(tmp_path / "ref"), "--shard-size", "1KB", "--dtype", "fp16",
                     "--no-progress"]) == 0
    assert files_of(out) == files_of(tmp_path / "ref")
    rc, _, err = torchrun(["-m", "fastsoup", "average", *zoo.paths, "-o", out])  # exists, no --overwrite
    assert rc != 0
    workers = err.split("elastic/multiprocessing/api.py")[0]  # after it: torchrun's own report of the failure
    errors = [line for line in workers.splitlines() if line.startswith("fastsoup: error: ")]
    # One line per rank that got to print it (torchrun stops the other workers once one has exited).
    assert 1 <= len(errors) <= 2 and "Traceback" not in workers, workers
    assert all(f"{out} exists" in e and "--overwrite" in e for e in errors), errors
    assert leftovers(tmp_path) == []


MODULE = textwrap.dedent('''
    import sys
    sys.path.insert(0, {tests!r})
    import _tiny
    from safetensors.torch import load_file

    def model():
        m = _tiny.MLP()
        m.load_state_dict(load_file({init!r}))
        return m

    def heldout():
        return _tiny.batches(*_tiny.make_data(_tiny.HELDOUT_SIZE, 3))

    def shifted():
        return _tiny.batches(*_tiny.make_data(97, 4, noise=1.0), size=20)
''')


@pytest.mark.slow  # the module's torchrun launches (the setup fixture)
def test_cli_greedy_under_torchrun(setup, tmp_path):
    zoo, cfg, _, root = setup
    mod = tmp_path / "distzoo.py"
    mod.write_text(MODULE.format(tests=HERE, init=cfg["init"]))
    args = ["greedy", *zoo.paths, "--model", f"{mod}:model", "--heldout", f"{mod}:heldout", "--eval",
            f"shift={mod}:shifted"]
    rc, out, err = torchrun(["-m", "fastsoup", *args, "-o", tmp_path / "dist", "--cache", tmp_path / "dist_cache"])
    assert rc == 0, err[-3000:]
    assert cli.main([*args, "-o", str(tmp_path / "one"), "--cache", str(tmp_path / "one_cache"), "--no-progress"]) == 0
    assert out.count("greedy soup:") == 1  # the table, from rank 0 only
    rows = [open(tmp_path / c / "results.jsonl").read() for c in ("dist_cache", "one_cache")]
    assert rows[0] == rows[1]
    have, want = files_of(tmp_path / "dist"), files_of(tmp_path / "one")
    assert json.loads(have.pop("soup.json"))["indices"] == json.loads(want.pop("soup.json"))["indices"]
    assert same_manifest(have, want)
    assert have == want
