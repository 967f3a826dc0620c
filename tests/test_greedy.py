"""greedy_soup / greedy_ensemble on a tiny zoo of real fine-tuned models (tests/_tiny.py): decisions
against the plain-torch oracle ``_reference.greedy_soup``, exact early rejection, reads of the checkpoint
files, the logit cache and decision journal (reruns, resume after a failure, a torn journal), errors,
GreedyResult's save/state_dict/load_into, and the torch-free ``import fastsoup``."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastsoup
from fastsoup import _reference
from fastsoup.search import CacheMismatchError
from fastsoup.search import evaluate, load_heldout, prepare
from conftest import bits_equal

import _tiny

TIMEOUT = 300  # seconds for one subprocess: a hang fails the test instead of blocking CI


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with _tiny.one_thread():  # the models are tiny: more threads only add overhead
        yield


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return _tiny.build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def reference(zoo):
    """strict -> (kept indices, score, individual scores) of the plain-torch oracle."""
    with _tiny.one_thread():
        return {strict: _reference.greedy_soup(zoo.state_dicts, _tiny.MLP(), zoo.heldout, strict=strict)
                for strict in (False, True)}


class Boom(RuntimeError):
    pass


def count_forward(model, fail_after=None) -> list:
    """Counts the model's forward calls (an instance attribute: the class, repr and state dict, hence the
    cache's fingerprint of the model, are unchanged); raises Boom on call ``fail_after + 1``."""
    calls = []
    inner = model.forward

    def forward(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise Boom(f"injected failure at forward call {len(calls) + 1}")
        calls.append(1)
        return inner(*args, **kwargs)

    model.forward = forward
    return calls


def decisions(result) -> list:
    return [(h["step"], h["index"], h["accepted"]) for h in result.history]


def full_history(result) -> list:
    return [{k: h[k] for k in ("step", "index", "name", "score", "accepted", "batches", "of")} for h in result.history]


def stable_ranking(scores) -> list:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def accuracy_metric(logits, labels) -> float:
    """Accuracy as a callable (callables are always evaluated to the end)."""
    return int((logits.argmax(dim=-1) == labels).sum()) / labels.shape[0]


# --- the zoo -------------------------------------------------------------------------------------------


def test_the_zoo_makes_a_useful_search(zoo, reference):
    kept, score, scores = reference[False]
    n = len(zoo.paths)
    assert len(kept) >= 2 and len(kept) < n - 1  # accepts several, rejects several
    assert score > max(scores)  # the greedy soup beats every ingredient
    assert _tiny.DIVERGED not in kept and scores[_tiny.DIVERGED] < 0.5  # the too-large learning rate
    assert max(scores) < 1.0
    assert len(reference[True][0]) >= 2
    sizes = [int(y.shape[0]) for _, y in zoo.heldout]
    assert sizes[-1] != sizes[0] and sizes[-1] % 2 == 1  # odd-sized last batch
    assert all(fastsoup.open_checkpoint(p).nbytes == zoo.float_bytes for p in zoo.paths)  # all float32


# --- decisions against the oracle ----------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True], ids=["ge", "gt"])
def test_greedy_soup_matches_the_reference(zoo, reference, strict):
    kept, score, scores = reference[strict]
    model = zoo.model()
    result = fastsoup.greedy_soup(zoo.paths, model, zoo.heldout, strict=strict)
    assert result.indices == kept
    assert result.score == score
    assert result.individual_scores == scores
    assert result.order == stable_ranking(scores)
    assert result.ingredients == [zoo.paths[i] for i in kept]
    assert result.names == zoo.paths
    assert result.strict is strict and result.metric == "accuracy"
    n = len(zoo.paths)
    assert [h["step"] for h in result.history] == list(range(n))
    assert [h["index"] for h in result.history] == result.order
    assert [h["index"] for h in result.history if h["accepted"]] == kept
    assert result.history[0]["source"] == "individual"
    assert all(h["source"] == "evaluated" for h in result.history[1:])
    accepted_scores = [h["score"] for h in result.history if h["accepted"]]
    assert accepted_scores == sorted(accepted_scores) and accepted_scores[-1] == score
    if strict:
        assert all(b > a for a, b in zip(accepted_scores, accepted_scores[1:]))


def test_in_memory_ingredients_give_the_same_search(zoo, reference):
    kept, score, _ = reference[False]
    result = fastsoup.greedy_soup(zoo.state_dicts, zoo.model(), zoo.heldout)
    assert (result.indices, result.score) == (kept, score)
    assert result.names == [f"<ingredient {i}>" for i in range(len(zoo.paths))]
    modules = []
    for sd in zoo.state_dicts:
        m = _tiny.MLP()
        m.load_state_dict(sd)
        modules.append(m)
    result = fastsoup.greedy_soup(modules, zoo.model(), zoo.heldout)
    assert (result.indices, result.score) == (kept, score)


@pytest.mark.parametrize("where", ["first", "last"])
def test_tied_scores_keep_the_input_order(zoo, reference, where):
    scores = reference[False][2]
    best = max(range(len(scores)), key=lambda i: scores[i])  # the first of the best
    # the same checkpoint twice: two ingredients with exactly the same score
    if where == "first":
        paths, sds, twins = [zoo.paths[best]] + zoo.paths, [zoo.state_dicts[best]] + zoo.state_dicts, (0, best + 1)
    else:
        paths, sds, twins = zoo.paths + [zoo.paths[best]], zoo.state_dicts + [zoo.state_dicts[best]], (best, len(zoo.paths))
    for strict in (False, True):
        kept, score, ref_scores = _reference.greedy_soup(sds, _tiny.MLP(), zoo.heldout, strict=strict)
        result = fastsoup.greedy_soup(paths, zoo.model(), zoo.heldout, strict=strict)
        assert result.individual_scores == ref_scores
        assert result.individual_scores[twins[0]] == result.individual_scores[twins[1]]
        assert result.order[:2] == list(twins)  # the earlier one first
        assert result.order == stable_ranking(ref_scores)
        assert (result.indices, result.score) == (kept, score)
        assert result.indices[0] == twins[0]
        # the twin's soup with it is exactly it (x + x, halved): a tie, kept by >= and not by >
        # (early rejection must evaluate a candidate that can still tie to the end; under > a tie
        # cannot pass, and it stops once it has made all of the soup's errors)
        h = result.history[1]
        assert h["index"] == twins[1] and h["accepted"] is (not strict)
        if strict:
            assert h["score"] is None and h["batches"] < h["of"]
        else:
            assert h["score"] == result.individual_scores[twins[0]] and h["batches"] == h["of"]


def plain_greedy(sds, data, order, strict=False):
    """Greedy over a given order, plainly: re-average from scratch, evaluate on everything."""
    model = _tiny.MLP()
    like = _tiny.clone_state(model)
    model.load_state_dict(sds[order[0]])
    kept, best = [order[0]], _tiny.accuracy(model, data)
    for j in order[1:]:
        model.load_state_dict(_reference.soup_state_dict([sds[i] for i in kept + [j]], like))
        acc = _tiny.accuracy(model, data)
        if acc > best or (not strict and acc == best):
            kept.append(j)
            best = acc
    return kept, best


def test_order_overrides_the_ranking(zoo):
    order = [_tiny.DIVERGED, 0, 5, 1, 3]  # worst first, a subset of the ingredients
    result = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, order=order)
    assert result.order == order
    assert [h["index"] for h in result.history] == order
    assert (result.indices, result.score) == plain_greedy(zoo.state_dicts, zoo.heldout, order)
    assert result.indices[0] == _tiny.DIVERGED
    assert len(result.history) == len(order)


@pytest.mark.parametrize("order", [[], [0, 0], [0, 8], [-1, 2], [1, 2, 1]])
def test_bad_order_is_refused(zoo, order):
    with pytest.raises(ValueError, match=r"order must list distinct ingredient indices in \[0, 8\)"):
        fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, order=order)


# --- early rejection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True], ids=["ge", "gt"])
def test_early_rejection_decides_as_a_full_evaluation(zoo, strict):
    early = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, strict=strict)
    full = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, strict=strict, metric=accuracy_metric)
    assert decisions(early) == decisions(full)
    assert (early.indices, early.score) == (full.indices, full.score)
    assert full.metric.endswith("accuracy_metric")
    nb = len(zoo.heldout)
    assert full.stats.batches_saved == 0 and all(h["batches"] == nb for h in full.history)
    assert early.stats.batches_saved > 0
    stopped = [h for h in early.history if h["batches"] < h["of"]]
    assert stopped and any(h["index"] == _tiny.DIVERGED for h in stopped)
    for h in stopped:
        assert h["score"] is None and not h["accepted"] and h["of"] == nb
    for h_early, h_full in zip(early.history, full.history):
        if h_early["score"] is not None:
            assert h_early["score"] == h_full["score"]
    assert early.stats.batches_saved == sum(nb - h["batches"] for h in early.history[1:])
    assert early.stats.batches_evaluated == sum(h["batches"] for h in early.history[1:])
    assert early.stats.evaluations == full.stats.evaluations == 2 * len(zoo.paths) - 1


class Echo(nn.Module):
    """Returns its input as the logits: the test chooses which examples are right."""

    def forward(self, x):
        return x


def echo_data(right_per_batch, size=4):
    batches = []
    for right in right_per_batch:
        y = torch.zeros(size, dtype=torch.long)
        x = torch.zeros(size, 2)
        x[:right, 0] = 1.0  # right: argmax 0 == label
        x[right:, 1] = 1.0  # wrong: argmax 1
        batches.append((x, y))
    return prepare(batches, "cpu")


def test_early_rejection_stops_exactly_when_the_threshold_is_out_of_reach():
    data = echo_data([1, 4, 4, 4])  # 13 right of 16
    assert evaluate(Echo(), data, need=13).complete  # reachable to the end: evaluated fully
    ev = evaluate(Echo(), data, need=13)
    assert ev.correct == 13 and ev.batches == 4 and ev.score == 13 / 16
    # need 14: after batch 1, 1 + 12 remaining < 14 -> stop
    ev = evaluate(Echo(), data, need=14)
    assert not ev.complete and ev.batches == 1 and ev.score is None and ev.logits is None
    data = echo_data([4, 4, 2, 4])  # 14 right: 15 is out of reach after batch 3 (10 + 4)
    ev = evaluate(Echo(), data, need=15)
    assert not ev.complete and ev.batches == 3
    data = echo_data([4, 4, 4, 1])  # the misses come last: the last batch is evaluated, the caller decides
    ev = evaluate(Echo(), data, need=14)
    assert ev.complete and ev.batches == 4 and ev.correct == 13


# --- reads ---------------------------------------------------------------------------------------------


def test_each_checkpoint_is_read_about_once(zoo):
    n, size = len(zoo.paths), zoo.float_bytes
    result = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout)
    assert result.stats.bytes_read_individual == n * size
    assert result.stats.bytes_read_search <= (n + 1) * size
    # the search forms n - 1 candidates from a soup of the first: n reads
    assert result.stats.bytes_read_search == n * size


# --- cache and journal ---------------------------------------------------------------------------------


def test_rerun_with_the_cache_evaluates_nothing(zoo, tmp_path):
    cache = tmp_path / "cache"
    model = zoo.model()
    calls = count_forward(model)
    first = fastsoup.greedy_soup(zoo.paths, model, zoo.heldout, cache_dir=cache)
    assert first.stats.evaluations == 2 * len(zoo.paths) - 1 and first.stats.cached == 0
    assert first.stats.reorder == "examples" and first.stats.check_batches == 3  # the regrouping check, once
    assert len(calls) == len(zoo.paths) * len(zoo.heldout) + first.stats.batches_evaluated + first.stats.check_batches
    assert (cache / "manifest.json").exists() and (cache / "journal.jsonl").exists()

    model = zoo.model()
    calls = count_forward(model)
    again = fastsoup.greedy_soup(zoo.paths, model, zoo.heldout, cache_dir=cache)
    assert again.stats.evaluations == 0 and len(calls) == 0
    assert again.stats.bytes_read_individual == 0 and again.stats.bytes_read_search == 0
    assert full_history(again) == full_history(first)
    assert (again.indices, again.score, again.individual_scores) == (first.indices, first.score, first.individual_scores)
    assert all(h["source"] == "journal" for h in again.history[1:])

    # the greedy ensemble needs only the ingredients' logits: all cached
    model = zoo.model()
    calls = count_forward(model)
    ens = fastsoup.greedy_ensemble(zoo.paths, model, zoo.heldout, cache_dir=cache)
    assert len(calls) == 0
    assert ens.individual_scores == first.individual_scores


def test_soup_logits_cached_by_another_search(zoo, tmp_path):
    cache = tmp_path / "cache"
    ge = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    # strict is another search (its own journal steps), but fully evaluated soups are in the logit cache
    gt = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache, strict=True)
    ref = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, strict=True)
    assert (gt.indices, gt.score) == (ref.indices, ref.score)
    assert decisions(gt) == decisions(ref)
    assert "cache" in {h["source"] for h in gt.history}
    assert gt.stats.evaluations < ref.stats.evaluations
    assert ge.individual_scores == gt.individual_scores


def test_cached_and_evaluated_steps_interleaved(zoo, tmp_path):
    # A second order over the same cache: some steps are answered by logits cached by the first search
    # (their soups are then rebuilt from the kept ingredients), others evaluated.
    cache = tmp_path / "cache"
    first = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    kept = first.indices
    rest = [i for i in range(len(zoo.paths)) if i not in kept and i != _tiny.DIVERGED]
    order = [kept[0], rest[0]] + kept[1:] + rest[1:] + [_tiny.DIVERGED]
    result = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache, order=order)
    sources = [h["source"] for h in result.history]
    assert "cache" in sources and "evaluated" in sources[sources.index("cache"):]
    assert (result.indices, result.score) == plain_greedy(zoo.state_dicts, zoo.heldout, order)


def test_resume_after_a_failure(zoo, tmp_path):
    n, nb = len(zoo.paths), len(zoo.heldout)
    uninterrupted = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout)
    # candidate steps completed before the failure: at least 2, and the next step evaluates several batches
    done = next(k for k in range(2, n - 1) if uninterrupted.history[k + 1]["batches"] >= 2)
    cache = tmp_path / "cache"
    model = zoo.model()
    check = uninterrupted.stats.check_batches  # the one-time regrouping check, before the first candidate's batches
    before_fail = n * nb + check + sum(h["batches"] for h in uninterrupted.history[1:done + 1]) + 1  # in step done + 1
    calls = count_forward(model, fail_after=before_fail)
    with pytest.raises(Boom):
        fastsoup.greedy_soup(zoo.paths, model, zoo.heldout, cache_dir=cache)
    assert len(calls) == before_fail
    records = [json.loads(line) for line in open(cache / "journal.jsonl")]
    assert [r["step"] for r in records] == list(range(1, done + 1))
    assert [(r["step"], r["index"], r["accepted"]) for r in records] == decisions(uninterrupted)[1:done + 1]

    model = zoo.model()
    calls = count_forward(model)
    resumed = fastsoup.greedy_soup(zoo.paths, model, zoo.heldout, cache_dir=cache)
    assert [h["source"] for h in resumed.history[1:]] == ["journal"] * done + ["evaluated"] * (n - 1 - done)
    assert resumed.stats.evaluations == n - 1 - done  # the ingredients' logits were cached, the steps journaled
    assert len(calls) == sum(h["batches"] for h in uninterrupted.history[done + 1:]) + resumed.stats.check_batches
    assert full_history(resumed) == full_history(uninterrupted)
    assert (resumed.indices, resumed.score) == (uninterrupted.indices, uninterrupted.score)
    # the soup is rebuilt from the kept ingredients once, then one read per candidate
    assert resumed.stats.bytes_read_search <= (n + 1) * zoo.float_bytes


def tear_last_line(path):
    lines = open(path).read().splitlines(True)
    with open(path, "w") as f:
        f.write("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    return len(lines)


def test_a_torn_last_journal_line_is_ignored(zoo, tmp_path):
    cache = tmp_path / "cache"
    first = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    last = first.history[-1]
    assert last["index"] == _tiny.DIVERGED and last["batches"] < last["of"]  # rejected early: not in the logit cache
    tear_last_line(cache / "journal.jsonl")
    model = zoo.model()
    calls = count_forward(model)
    again = fastsoup.greedy_soup(zoo.paths, model, zoo.heldout, cache_dir=cache)
    assert [h["source"] for h in again.history[1:]] == ["journal"] * (len(zoo.paths) - 2) + ["evaluated"]
    assert again.stats.evaluations == 1 and len(calls) == last["batches"] + again.stats.check_batches
    assert full_history(again) == full_history(first)


def test_the_step_redone_after_a_torn_line_is_journaled(zoo, tmp_path):
    cache = tmp_path / "cache"
    fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    tear_last_line(cache / "journal.jsonl")
    fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)  # re-evaluates the torn step
    third = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    assert third.stats.evaluations == 0


def test_greedy_ensemble_first_then_greedy_soup(zoo, tmp_path):
    cache = tmp_path / "cache"
    fastsoup.greedy_ensemble(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    result = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    assert result.stats.evaluations == len(zoo.paths) - 1  # the candidates only
    assert result.stats.bytes_read_individual == 0


def test_searches_over_other_ingredient_sets_share_the_cache(zoo, tmp_path):
    cache = tmp_path / "cache"
    fastsoup.greedy_soup(zoo.paths[:4], zoo.model(), zoo.heldout, cache_dir=cache)
    model = zoo.model()
    result = fastsoup.greedy_soup(zoo.paths, model, zoo.heldout, cache_dir=cache)
    cold = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout)
    assert full_history(result) == full_history(cold)
    assert result.stats.bytes_read_individual == (len(zoo.paths) - 4) * zoo.float_bytes  # 4 were cached
    assert result.stats.evaluations <= cold.stats.evaluations - 4


def test_a_damaged_cache_entry_is_a_miss(zoo, tmp_path):
    cache = tmp_path / "cache"
    first = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    entries = sorted((cache / "logits").iterdir())
    assert len(entries) >= len(zoo.paths)
    for e in entries:
        e.write_bytes(e.read_bytes()[:20])  # truncated
    with pytest.warns(UserWarning, match="ignoring the unreadable cache entry"):
        again = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    assert again.stats.evaluations == len(zoo.paths)  # the ingredients again; the steps are journaled
    assert full_history(again) == full_history(first)
    third = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)  # rewritten entries
    assert third.stats.evaluations == 0


def test_heldout_as_a_data_loader_or_dicts(zoo, tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.cat([x for x, _ in zoo.heldout])
    y = torch.cat([y for _, y in zoo.heldout])
    cache = tmp_path / "cache"
    listed = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    loader = DataLoader(TensorDataset(x, y), batch_size=_tiny.BATCH)
    model = zoo.model()
    calls = count_forward(model)
    loaded = fastsoup.greedy_soup(zoo.paths, model, loader, cache_dir=cache)  # the same data: the same cache
    assert len(calls) == 0 and full_history(loaded) == full_history(listed)
    dicts = [{"images": xb, "labels": yb} for xb, yb in zoo.heldout]
    assert full_history(fastsoup.greedy_soup(zoo.paths, zoo.model(), dicts)) == full_history(listed)
    with pytest.raises(fastsoup.FastsoupError, match="batch 0 is a dict"):
        fastsoup.greedy_soup(zoo.paths, zoo.model(), [{"x": x, "y": y}])


def test_one_ingredient_and_progress_bars(zoo, capsys):
    result = fastsoup.greedy_soup(zoo.paths[:1], zoo.model(), zoo.heldout)
    assert result.indices == [0] and result.score == result.individual_scores[0] and len(result.history) == 1
    fastsoup.greedy_soup(zoo.paths[:2], zoo.model(), zoo.heldout, progress=True)
    err = capsys.readouterr().err
    assert "heldout" in err and "greedy 1/1" in err


# --- errors --------------------------------------------------------------------------------------------


def test_ingredients_that_do_not_match_the_model(zoo, tmp_path):
    with pytest.raises(fastsoup.CheckpointError):
        fastsoup.greedy_soup(zoo.paths, _tiny.MLP(hidden=16), zoo.heldout)
    with pytest.raises(fastsoup.CheckpointError):
        fastsoup.greedy_ensemble(zoo.paths, _tiny.MLP(hidden=16), zoo.heldout)
    bad = dict(zoo.state_dicts[1])
    del bad["fc2.bias"]
    with pytest.raises(fastsoup.CheckpointError, match="fc2.bias"):
        fastsoup.greedy_soup([zoo.paths[0], bad], zoo.model(), zoo.heldout, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused before the cache is opened


def test_empty_heldout(zoo):
    x, y = zoo.heldout[0]
    for empty in ([], [(x[:0], y[:0])], iter(())):
        with pytest.raises(fastsoup.FastsoupError, match="empty"):
            fastsoup.greedy_soup(zoo.paths, zoo.model(), empty)
    with pytest.raises(fastsoup.FastsoupError, match="iterable"):
        fastsoup.greedy_soup(zoo.paths, zoo.model(), 42)


def test_cache_of_another_data_set_is_refused(zoo, tmp_path):
    cache = tmp_path / "cache"
    fastsoup.greedy_soup(zoo.paths[:3], zoo.model(), zoo.heldout, cache_dir=cache)
    changed = [(x, y.clone()) for x, y in zoo.heldout]
    changed[-1][1][0] = (changed[-1][1][0] + 1) % _tiny.CLASSES  # one label
    with pytest.raises(CacheMismatchError, match="data set 'heldout'"):
        fastsoup.greedy_soup(zoo.paths[:3], zoo.model(), changed, cache_dir=cache)
    with pytest.raises(CacheMismatchError):
        fastsoup.greedy_ensemble(zoo.paths[:3], zoo.model(), zoo.heldout[:-1], cache_dir=cache)
    assert issubclass(CacheMismatchError, fastsoup.FastsoupError)


def test_cache_of_another_model_is_refused(zoo, tmp_path):
    cache = tmp_path / "cache"
    fastsoup.greedy_soup(zoo.paths[:3], zoo.model(), zoo.heldout, cache_dir=cache)
    tanh = _tiny.MLP(act=nn.Tanh)  # same state dict, another architecture
    with pytest.raises(CacheMismatchError, match=r"the model \(MLP\)"):
        fastsoup.greedy_soup(zoo.paths[:3], tanh, zoo.heldout, cache_dir=cache)
    # a new cache for it works
    fastsoup.greedy_soup(zoo.paths[:3], tanh, zoo.heldout, cache_dir=tmp_path / "other")


@pytest.mark.parametrize("metric", ["top5", "Accuracy", 3, None])
def test_bad_metric(zoo, metric):
    with pytest.raises(ValueError, match="metric must be 'accuracy' or a callable"):
        fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, metric=metric)


def test_no_ingredients_and_not_a_module(zoo):
    with pytest.raises(ValueError, match="no ingredients"):
        fastsoup.greedy_soup([], zoo.model(), zoo.heldout)
    with pytest.raises(ValueError, match="no ingredients"):
        fastsoup.greedy_ensemble([], zoo.model(), zoo.heldout)
    with pytest.raises(TypeError, match="nn.Module"):
        fastsoup.greedy_soup(zoo.paths, zoo.state_dicts[0], zoo.heldout)


# --- the result ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def result(zoo):
    return fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout)


def test_result_state_dict_and_load_into(zoo, result):
    kept = [zoo.state_dicts[i] for i in result.indices]
    expected = _reference.soup_state_dict(kept, kept[0])
    got = result.state_dict()
    assert list(got) == list(fastsoup.open_checkpoint(zoo.paths[result.indices[0]]))
    for name, t in expected.items():
        assert bits_equal(got[name], t), name
    model = _tiny.MLP()
    assert result.load_into(model) is model
    for name, t in model.state_dict().items():
        assert bits_equal(t, expected[name]), name
    assert _tiny.accuracy(model, zoo.heldout) == result.score
    soup = result.soup()
    assert len(soup) == len(result.indices) and [s for s, _ in soup.ingredients] == result.ingredients


def test_result_save_single_file(zoo, result, tmp_path):
    out = tmp_path / "greedy.safetensors"
    assert result.save(out) == os.fspath(out)
    from safetensors.torch import load_file

    on_disk = load_file(str(out))
    value = result.state_dict()
    assert sorted(on_disk) == sorted(value)
    for name, t in value.items():
        assert bits_equal(on_disk[name], t), name
    side = json.load(open(tmp_path / "greedy.json"))
    assert side["recipe"] == "greedy_soup" and side["rule"] == ">=" and side["metric"] == "accuracy"
    assert side["ingredients"] == [zoo.paths[i] for i in result.indices]
    assert side["indices"] == result.indices and side["order"] == result.order
    assert side["score"] == result.score
    assert side["history"] == result.history
    assert side["individual_scores"] == [{"name": n, "score": v} for n, v in zip(zoo.paths, result.individual_scores)]
    assert side["stats"]["evaluations"] == result.stats.evaluations
    with pytest.raises(fastsoup.OutputExistsError):
        result.save(out)
    result.save(out, overwrite=True, dtype="bf16")
    assert load_file(str(out))["fc1.weight"].dtype == torch.bfloat16


def test_result_save_sharded_folder(zoo, result, tmp_path):
    out = tmp_path / "greedy"
    result.save(out, shard_size="1KB")
    side = json.load(open(out / "soup.json"))
    assert side["ingredients"] == [zoo.paths[i] for i in result.indices]
    assert [h["index"] for h in side["history"]] == result.order
    assert len([p for p in os.listdir(out) if p.endswith(".safetensors")]) > 1
    got = fastsoup.open_checkpoint(out)  # the sidecar does not disturb reading the folder
    for name, t in result.state_dict().items():
        assert bits_equal(got.tensor(name), t), name


# --- greedy ensemble -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True], ids=["ge", "gt"])
def test_greedy_ensemble_matches_a_plain_implementation(zoo, strict):
    labels = torch.cat([y for _, y in zoo.heldout])
    logits = [_tiny.logits_of(_tiny.MLP(), sd, zoo.heldout) for sd in zoo.state_dicts]

    def acc(lg):
        return int((lg.argmax(-1) == labels).sum()) / len(labels)

    scores = [acc(lg) for lg in logits]
    order = stable_ranking(scores)
    members, best = [order[0]], scores[order[0]]
    for j in order[1:]:
        mean = torch.stack([logits[i].double() for i in members + [j]]).mean(0).float()
        a = acc(mean)
        if a > best or (not strict and a == best):
            members.append(j)
            best = a
    ens = fastsoup.greedy_ensemble(zoo.paths, zoo.model(), zoo.heldout, strict=strict)
    assert ens.individual_scores == scores
    assert (ens.members, ens.score) == (members, best)
    assert len(ens.members) >= 2
    assert [h["index"] for h in ens.history] == order
    assert [h["index"] for h in ens.history if h["accepted"]] == members


# --- integer buffers during the search -----------------------------------------------------------------


class Shifted(_tiny.MLP):
    """An integer buffer that the forward pass uses (it rotates the classes)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(0))

    def forward(self, x):
        return super().forward(x).roll(int(self.shift), dims=-1)


def test_integer_buffers_of_the_candidates_are_those_of_the_soup(zoo):
    sds = [dict(sd, shift=torch.tensor(0)) for sd in zoo.state_dicts]
    sds[-1]["shift"] = torch.tensor(1)  # the last ingredient is scored last; it is never the first kept
    kept, score, _ = _reference.greedy_soup(sds, Shifted(), zoo.heldout)
    assert kept[0] != len(sds) - 1 and len(kept) >= 2
    result = fastsoup.greedy_soup(sds, Shifted(), zoo.heldout)
    assert (result.indices, result.score) == (kept, score)


# --- import ------------------------------------------------------------------------------------------------


def test_import_fastsoup_does_not_import_torch():
    code = (
        "import sys, fastsoup\n"
        "fastsoup.RECIPES\n"
        "print('torch' in sys.modules)\n"
        "f = fastsoup.greedy_soup\n"
        "import fastsoup.recipes.greedy as g, fastsoup.recipes.ensemble as e\n"
        "print(f is g.greedy_soup, fastsoup.greedy_ensemble is e.greedy_ensemble, fastsoup.GreedyResult is g.GreedyResult)\n"
        "print(fastsoup.RECIPES['greedy'].run is g.greedy_soup)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "True", "True", "True"]
    with pytest.raises(AttributeError, match="no attribute 'greedy_soups'"):
        fastsoup.greedy_soups


@pytest.mark.parametrize("strict", [False, True], ids=["ge", "gt"])
def test_every_reorder_gives_the_same_decisions(zoo, reference, strict):
    """Hardest examples first (regrouped), hardest batches first, or the set's order: they change only
    when a rejected candidate stops, never a decision or a score."""
    from fastsoup.recipes.greedy import run_greedy
    from fastsoup.search import Search

    runs = {}
    for reorder in ("examples", "batches", "none"):
        s = Search(zoo.paths, zoo.model(), zoo.heldout, progress=False)
        runs[reorder] = run_greedy(s, strict=strict, reorder=reorder)
        assert runs[reorder].stats.reorder == reorder and runs[reorder].stats.reorder_note == ""
    kept, score, _ = reference[strict]
    for reorder, r in runs.items():
        assert (r.indices, r.score) == (kept, score), reorder
        assert [(h["index"], h["accepted"]) for h in r.history] == [(h["index"], h["accepted"]) for h in runs["none"].history]
        for h, h0 in zip(r.history, runs["none"].history):
            if h["accepted"]:
                assert h["score"] == h0["score"] and h["batches"] == h["of"]
    assert runs["examples"].stats.check_batches == 3 and runs["batches"].stats.check_batches == 0
    assert runs["examples"].stats.batches_saved > 0  # early rejection was exercised


def test_regrouped_evaluation_equals_the_sets_batches(zoo):
    from fastsoup.search.regroup import check_regrouping, regroup, regroupable

    held = prepare(zoo.heldout, "cpu")
    assert regroupable(held) is None
    model = zoo.model()
    model.load_state_dict(zoo.state_dicts[0])
    natural = evaluate(model, held)
    order = torch.randperm(held.size, generator=torch.Generator().manual_seed(0))
    plan = regroup(held, order)
    assert [len(i) for i in plan.ids] == [int(y.shape[0]) for _, y in held.batches]  # the set's batch sizes
    assert torch.equal(torch.cat(plan.ids).sort().values, torch.arange(held.size))
    assert check_regrouping(model, held, plan) is None
    got = evaluate(model, held, regrouping=plan)
    assert bits_equal(got.logits, natural.logits) and got.correct == natural.correct
    # hardest first by its own margins: all of its errors come first, and one more correct example
    # than it has is out of reach after the first batch
    from fastsoup.recipes.greedy import _hardest_examples

    own = regroup(held, _hardest_examples(held, natural.logits))
    assert int((natural.logits.argmax(-1) != held.labels).sum()) <= len(own.ids[0])
    stopped = evaluate(model, held, need=natural.correct + 1, regrouping=own)
    assert not stopped.complete and stopped.batches == 1
    assert evaluate(model, held, need=natural.correct, regrouping=own).correct == natural.correct  # reachable: to the end
    with pytest.raises(ValueError, match="permutation of the 301 example"):
        regroup(held, torch.arange(held.size - 1))
    with pytest.raises(ValueError, match="permutation of the 301 example"):
        regroup(held, torch.zeros(held.size, dtype=torch.int64))


class BatchCentred(_tiny.MLP):
    """Logits minus half the batch's mean logits: an example's logits depend on the rest of its batch."""

    def forward(self, x):
        out = super().forward(x)
        return out - 0.5 * out.mean(dim=0, keepdim=True)


class RowBiased(_tiny.MLP):
    """A bias that grows with the row's position in the batch."""

    def forward(self, x):
        out = super().forward(x)
        rows = torch.arange(out.shape[0], dtype=out.dtype)[:, None]
        return out + 1e-3 * rows * torch.arange(out.shape[1], dtype=out.dtype)


@pytest.mark.parametrize("cls,why", [(BatchCentred, "logits change when its rows"), (RowBiased, "rows are reversed")],
                         ids=["batch-dependent", "position-dependent"])
def test_a_model_whose_logits_depend_on_the_batch_keeps_the_sets_batches(zoo, cls, why):
    kept, score, scores = _reference.greedy_soup(zoo.state_dicts, cls(), zoo.heldout)
    result = fastsoup.greedy_soup(zoo.paths, cls(), zoo.heldout)
    assert result.stats.reorder == "batches" and why in result.stats.reorder_note
    assert (result.indices, result.score, result.individual_scores) == (kept, score, scores)


class Padded(_tiny.MLP):
    """Takes inputs padded with zero columns (to a width that differs from batch to batch)."""

    def forward(self, x):
        return super().forward(x[:, :_tiny.IN])


def test_batches_that_cannot_be_regrouped_keep_the_sets_batches(zoo):
    data = [(torch.cat([x, torch.zeros(x.shape[0], i)], 1), y) for i, (x, y) in enumerate(zoo.heldout)]
    kept, score, _ = _reference.greedy_soup(zoo.state_dicts, Padded(), data)
    result = fastsoup.greedy_soup(zoo.paths, Padded(), data)
    assert result.stats.reorder == "batches" and "differs from batch 0" in result.stats.reorder_note
    assert (result.indices, result.score) == (kept, score)
    with pytest.raises(ValueError, match="reorder must be one of"):
        fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, reorder="random")


class Keyed(_tiny.MLP):
    def forward(self, inputs, scale):
        return super().forward(inputs * scale)


def test_dict_inputs_are_regrouped(zoo):
    data = [{"inputs": {"inputs": x, "scale": torch.ones(x.shape[0], 1)}, "labels": y} for x, y in zoo.heldout]
    kept, score, _ = _reference.greedy_soup(zoo.state_dicts, _tiny.MLP(), zoo.heldout)
    result = fastsoup.greedy_soup(zoo.paths, Keyed(), data)
    assert result.stats.reorder == "examples" and result.stats.reorder_note == ""
    assert (result.indices, result.score) == (kept, score)


# --- the held-out data stored in the cache ---------------------------------------------------------------


class CountingLoader:
    """Re-iterable batches that count how often the data pipeline ran."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def test_a_rerun_from_the_stored_heldout_runs_no_pipeline(zoo, tmp_path):
    cache = tmp_path / "cache"
    loader = CountingLoader(zoo.heldout)
    first = fastsoup.greedy_soup(zoo.paths, zoo.model(), loader, cache_dir=cache)
    assert loader.passes == 1 and (cache / "data" / "heldout.bin").exists() and (cache / "data" / "heldout.json").exists()
    assert not [p for p in os.listdir(cache / "data") if ".tmp-" in p]
    model = zoo.model()
    calls = count_forward(model)
    again = fastsoup.greedy_soup(zoo.paths, model, None, cache_dir=cache)
    assert loader.passes == 1 and len(calls) == 0 and again.stats.evaluations == 0
    assert full_history(again) == full_history(first)
    assert (again.indices, again.score, again.individual_scores) == (first.indices, first.score, first.individual_scores)
    ens = fastsoup.greedy_ensemble(zoo.paths, zoo.model(), None, cache_dir=cache)
    assert ens.individual_scores == first.individual_scores
    # the stored batches are the pipeline's, bit for bit, with their sizes and dtypes
    from fastsoup.search import load_heldout

    batches, fp = load_heldout(str(cache / "data" / "heldout"))
    assert fp == prepare(zoo.heldout, "cpu").fingerprint
    assert len(batches) == len(zoo.heldout)
    for (x, y), (x0, y0) in zip(batches, zoo.heldout):
        assert bits_equal(x, x0) and torch.equal(y, y0) and y.dtype == y0.dtype


def test_a_resume_from_the_stored_heldout_equals_an_uninterrupted_search(zoo, tmp_path):
    n, nb = len(zoo.paths), len(zoo.heldout)
    uninterrupted = fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout)
    cache = tmp_path / "cache"
    model = zoo.model()
    count_forward(model, fail_after=n * nb + uninterrupted.stats.check_batches + uninterrupted.history[1]["batches"] + 1)
    with pytest.raises(Boom):
        fastsoup.greedy_soup(zoo.paths, model, zoo.heldout, cache_dir=cache)
    resumed = fastsoup.greedy_soup(zoo.paths, zoo.model(), None, cache_dir=cache)
    assert [h["source"] for h in resumed.history[1:2]] == ["journal"]
    assert full_history(resumed) == full_history(uninterrupted)
    assert (resumed.indices, resumed.score) == (uninterrupted.indices, uninterrupted.score)


def test_stored_heldout_errors(zoo, tmp_path):
    with pytest.raises(ValueError, match="heldout=None takes the held-out data stored in cache_dir"):
        fastsoup.greedy_soup(zoo.paths, zoo.model(), None)
    with pytest.raises(fastsoup.FastsoupError, match="no stored held-out data"):
        fastsoup.greedy_soup(zoo.paths, zoo.model(), None, cache_dir=tmp_path / "empty")
    # a damaged stored set: its bytes no longer give the fingerprint it was stored with
    cache = tmp_path / "cache"
    fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    path = cache / "data" / "heldout.bin"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(fastsoup.FastsoupError, match="does not match the fingerprint it was stored with"):
        fastsoup.greedy_soup(zoo.paths, zoo.model(), None, cache_dir=cache)
    # truncated: said so
    path.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(fastsoup.FastsoupError, match="truncated"):
        fastsoup.greedy_soup(zoo.paths, zoo.model(), None, cache_dir=cache)
    # the data set given again: the damaged copy is replaced
    fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    assert fastsoup.greedy_soup(zoo.paths, zoo.model(), None, cache_dir=cache).stats.evaluations == 0
    # batches holding other than tensors are not stored
    other = tmp_path / "other"
    data = [((x, [f"id{i}"] * len(y)), y) for i, (x, y) in enumerate(zoo.heldout)]

    class Tagged(_tiny.MLP):
        def forward(self, x, tags):
            return super().forward(x)

    fastsoup.greedy_soup(zoo.paths, Tagged(), data, cache_dir=other)
    assert not os.path.exists(other / "data") or not os.listdir(other / "data")
    with pytest.raises(fastsoup.FastsoupError, match="no stored held-out data"):
        fastsoup.greedy_soup(zoo.paths, Tagged(), None, cache_dir=other)


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) << 10
    raise RuntimeError("no RssAnon in /proc/self/status")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux) to read resident memory")
def test_a_stored_set_on_the_cpu_is_memory_mapped_not_copied(tmp_path):
    """200 MB of held-out inputs prepared with a store: the batches are views of the store's file, so
    anonymous memory grows by a few batches, not by the set (without a store it grows by the set).
    Measured in a fresh process: in this one, memory freed by earlier tests would be reused."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_greedy import _rss_anon
        from fastsoup.search import load_heldout, prepare
        torch.set_num_threads(1)
        n, rows, width = 50, 1024, 1024  # 50 batches of 4 MiB
        tmp = {str(tmp_path)!r}

        def batches():
            for i in range(n):
                g = torch.Generator().manual_seed(i)
                yield torch.rand(rows, width, generator=g), torch.randint(0, 4, (rows,), generator=g)

        size = n * rows * width * 4
        before = _rss_anon()
        held = prepare(batches(), "cpu", store=os.path.join(tmp, "set"))
        grew_mapped = _rss_anon() - before
        held.store.install()
        assert os.path.getsize(os.path.join(tmp, "set.bin")) >= size
        again, fp = load_heldout(os.path.join(tmp, "set"))
        assert fp == held.fingerprint and prepare(again, "cpu").fingerprint == held.fingerprint
        x0, y0 = next(iter(batches()))
        assert torch.equal(held.batches[0][0], x0) and torch.equal(again[0][1], y0)
        total = sum(x.sum() for x, _ in held.batches)  # every page read through the mapping
        assert torch.isfinite(total)
        assert grew_mapped < size // 4, (grew_mapped, size)
        del held, again
        before = _rss_anon()
        in_ram = prepare(batches(), "cpu")
        grew = _rss_anon() - before
        assert grew > size // 2, (grew, size)  # the test measures what it claims: without a store, the set is in RAM
        print("ok", grew_mapped, grew)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_storing_is_atomic_and_a_refused_set_leaves_nothing(zoo, tmp_path):
    cache = tmp_path / "cache"
    fastsoup.greedy_soup(zoo.paths, zoo.model(), zoo.heldout, cache_dir=cache)
    before = {p: (cache / "data" / p).read_bytes() for p in os.listdir(cache / "data")}
    changed = [(x + 1, y) for x, y in zoo.heldout]
    with pytest.raises(CacheMismatchError):
        fastsoup.greedy_soup(zoo.paths, zoo.model(), changed, cache_dir=cache)
    assert {p: (cache / "data" / p).read_bytes() for p in os.listdir(cache / "data")} == before  # untouched, no temporaries


def test_a_batch_that_cannot_be_stored_midway_keeps_the_set_whole(zoo, tmp_path):
    # batches 0-2 are stored (and mapped) before batch 3 turns out to hold a list of strings
    data = [((x, ["tag"] * len(y)) if i == 3 else (x, None), y) for i, (x, y) in enumerate(zoo.heldout)]
    data = [((x, t) if t is not None else x, y) for (x, t), y in data]
    held = prepare(data, "cpu", store=str(tmp_path / "set"))
    assert held.store is None and not os.listdir(tmp_path)  # nothing stored, no temporaries
    ref = prepare(data, "cpu")
    assert held.fingerprint == ref.fingerprint and torch.equal(held.labels, ref.labels)
    for (x, y), (x0, y0) in zip(held.batches, zoo.heldout):
        assert torch.equal(x if isinstance(x, torch.Tensor) else x[0], x0) and torch.equal(y, y0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.uint8, torch.bool, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_a_store_keeps_dtypes_shapes_and_structure(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    data = []
    for n in (5, 3, 0, 7):  # an empty batch too
        x = (torch.rand(n, 3, 2, generator=g) * 10).to(dtype)
        data.append(({"pixels": x, "extra": (torch.arange(n), x[:, 0])}, torch.randint(0, 3, (n,), generator=g)))
    held = prepare(data, "cpu", store=str(tmp_path / "s"))
    held.store.install()
    back, fp = load_heldout(str(tmp_path / "s"))
    assert fp == held.fingerprint == prepare(data, "cpu").fingerprint
    for (x, y), (x0, y0) in zip(back, data):
        assert x["pixels"].dtype == dtype and x["pixels"].shape == x0["pixels"].shape
        assert torch.equal(x["pixels"], x0["pixels"]) and torch.equal(x["extra"][1], x0["extra"][1])
        assert isinstance(x["extra"], tuple) and torch.equal(x["extra"][0], x0["extra"][0]) and torch.equal(y, y0)
