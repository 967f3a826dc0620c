"""The names of the public API (issue 21): one error hierarchy under FastsoupError whose classes are
also the built-in exceptions callers caught before; eval_device= / merge_device= of the searches, with
device= a deprecated alias; the same result fields (ingredients, indices, weights()) on every result,
the old spellings still working with a deprecation warning."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

import _tiny

import fastsoup
from fastsoup.search import Search


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return _tiny.build_zoo(tmp_path_factory.mktemp("zoo"))


# --- errors --------------------------------------------------------------------------------------------


def test_the_error_classes_are_one_hierarchy_and_keep_their_builtin_types():
    E = fastsoup
    for cls, builtin in ((E.ArgumentError, ValueError), (E.ArgumentTypeError, TypeError),
                         (E.CheckpointError, ValueError), (E.DataError, ValueError),
                         (E.CacheMismatchError, ValueError), (E.UnsafeOutputError, ValueError),
                         (E.OutputExistsError, FileExistsError), (E.InputChangedError, E.CheckpointError),
                         (E.DistributedError, E.FastsoupError)):
        assert issubclass(cls, E.FastsoupError) and issubclass(cls, builtin), cls
    assert not issubclass(E.ArgumentTypeError, ValueError)  # a TypeError stays a TypeError only
    # the classes the subpackages named before are the same objects
    from fastsoup.distributed import DistributedError
    from fastsoup.search.cache import CacheMismatchError
    assert DistributedError is E.DistributedError and CacheMismatchError is E.CacheMismatchError


def test_bad_arguments_raise_the_hierarchy(zoo, tmp_path):
    p = zoo.paths[:2]
    cases = [
        (lambda: fastsoup.average(p, [1.0]), fastsoup.ArgumentError, "weights"),
        (lambda: fastsoup.average(p, threads=0), fastsoup.ArgumentError, "threads"),
        (lambda: fastsoup.average(p, device="tpu"), fastsoup.ArgumentError, "device="),
        (lambda: fastsoup.average(p, dtype="int3"), fastsoup.ArgumentError, "dtype"),
        (lambda: fastsoup.average(p, out=str(tmp_path / "o"), shard_size="lots"), fastsoup.ArgumentError, "size"),
        (lambda: fastsoup.average(p, key_map=[("(", "x")]), fastsoup.ArgumentError, "regular expression"),
        (lambda: fastsoup.average(p, strip_prefix=3), fastsoup.ArgumentTypeError, "strip_prefix"),
        (lambda: fastsoup.uniform_soup(p, weights=[1, 2]), fastsoup.ArgumentTypeError, "no weights"),
        (lambda: fastsoup.Soup.like(p[0]).add(p[0], float("nan")), fastsoup.ArgumentError, "weight"),
        (lambda: fastsoup.greedy_soup(p, object(), zoo.heldout), fastsoup.ArgumentTypeError, "nn.Module"),
        (lambda: fastsoup.greedy_soup(p, zoo.model(), zoo.heldout, reorder="x"), fastsoup.ArgumentError, "reorder"),
        (lambda: fastsoup.greedy_soup(p, zoo.model(), zoo.heldout, order=[5]), fastsoup.ArgumentError, "order"),
        (lambda: fastsoup.greedy_soup(p, zoo.model(), zoo.heldout, metric=3), fastsoup.ArgumentError, "metric"),
        (lambda: fastsoup.greedy_soup(p, zoo.model(), zoo.heldout, verify="x"), fastsoup.ArgumentError, "verify"),
        (lambda: fastsoup.greedy_soup(p, zoo.model(), [42]), fastsoup.DataError, "batch 0"),
        (lambda: fastsoup.learned_soup(p, zoo.model(), zoo.heldout, lr=-1), fastsoup.ArgumentError, "lr"),
        (lambda: fastsoup.wise_ft_sweep(p[0], p[1], zoo.model(), zoo.heldout, alphas=[]), fastsoup.ArgumentError,
         "alphas"),
    ]
    for call, cls, match in cases:
        with pytest.raises(cls, match=match):
            call()


# --- eval_device / merge_device ------------------------------------------------------------------------


def test_eval_device_and_its_deprecated_alias(zoo):
    p = zoo.paths[:3]
    new = fastsoup.greedy_soup(p, zoo.model(), zoo.heldout, eval_device="cpu", merge_device="cpu")
    with pytest.warns(FutureWarning, match="eval_device="):
        old = fastsoup.greedy_soup(p, zoo.model(), zoo.heldout, device="cpu")
    assert (old.indices, old.score) == (new.indices, new.score)
    with pytest.raises(fastsoup.ArgumentError, match="eval_device= alone"):
        fastsoup.greedy_soup(p, zoo.model(), zoo.heldout, device="cpu", eval_device="cpu")
    for call in (lambda **kw: fastsoup.greedy_ensemble(p, zoo.model(), zoo.heldout, **kw),
                 lambda **kw: fastsoup.wise_ft_sweep(p[0], p[1], zoo.model(), zoo.heldout, alphas=[0.5], **kw),
                 lambda **kw: fastsoup.learned_soup(p, zoo.model(), zoo.heldout, steps=1, **kw),
                 lambda **kw: Search(p, zoo.model(), zoo.heldout, **kw)):
        with pytest.warns(FutureWarning, match="eval_device="):
            call(device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            call(eval_device="cpu")
        with pytest.raises(fastsoup.ArgumentError):
            call(device="cpu", eval_device="cpu")


def test_the_merge_device_defaults_to_the_cpu_for_a_model_on_the_cpu(zoo):
    s = Search(zoo.paths[:2], zoo.model(), zoo.heldout)
    assert str(s.device) == "cpu" and str(s.engine_device) == "cpu"
    with pytest.raises(fastsoup.ArgumentError, match="merge_device|device="):
        Search(zoo.paths[:2], zoo.model(), zoo.heldout, merge_device="tpu")


# --- result fields -------------------------------------------------------------------------------------


def test_every_result_has_ingredients_indices_and_weights(zoo):
    p = zoo.paths[:4]
    g = fastsoup.greedy_soup(p, zoo.model(), zoo.heldout)
    assert g.ingredients == [p[i] for i in g.indices] and g.weights() == [1.0 / len(g.indices)] * len(g.indices)
    e = fastsoup.greedy_ensemble(p, zoo.model(), zoo.heldout)
    assert e.ingredients == [p[i] for i in e.indices] and e.weights() == [1.0 / len(e.indices)] * len(e.indices)
    with pytest.warns(DeprecationWarning, match="indices"):
        assert e.members == e.indices
    r = fastsoup.learned_soup(p, zoo.model(), zoo.heldout, steps=2)
    assert r.ingredients == p and r.indices == [0, 1, 2, 3] and r.weights() == r.coefficients.tolist()
    with pytest.warns(DeprecationWarning, match="ingredients"):
        assert r.sources == p
    layerwise = fastsoup.learned_soup(p, zoo.model(), zoo.heldout, steps=1, layerwise=True)
    w = layerwise.weights()
    assert list(w) == layerwise.tensor_names and all(len(v) == 4 for v in w.values())


def test_learned_save_warns_about_nothing(zoo, tmp_path):
    r = fastsoup.learned_soup(zoo.paths[:2], zoo.model(), zoo.heldout, steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        r.save(str(tmp_path / "l.safetensors"))
