"""interpolate (WiSE-FT) against the plain-torch reference, and wise_ft_sweep's scores and cache."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import fastsoup  # noqa: E402
from fastsoup import _reference  # noqa: E402
from fastsoup.recipes.interpolate import DEFAULT_ALPHAS, SweepResult, interpolate, wise_ft_sweep  # noqa: E402
from torch import nn  # noqa: E402

from conftest import bits_equal  # noqa: E402

ALPHAS = [0.0, 0.25, 1.0, 1.5, -0.5]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)

    def sd():
        return {
            "layer.weight": torch.randn(33, 17, generator=g).to(dtype),
            "layer.bias": torch.randn(33, generator=g).to(dtype),
            "steps": torch.randint(0, 1000, (3,), generator=g),  # integer: copied from theta_0
            "norm.weight": (1 + 0.1 * torch.randn(33, generator=g)).to(dtype),
        }

    return sd(), sd()


def _reference_interpolation(a, b, alpha):
    """What the engine computes: float32 weights (1 - alpha, alpha), fused sum, cast to the dtype of a."""
    return {n: _reference.weighted_sum([t, b[n]], [1.0 - alpha, alpha], t.dtype) if t.is_floating_point() else t
            for n, t in a.items()}


def _check(got, expected):
    assert list(got) == list(expected)
    for n in expected:
        assert bits_equal(got[n], expected[n]), n


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_interpolate_state_dicts(alpha, dtype):
    a, b = _pair(dtype)
    _check(interpolate(a, b, alpha), _reference_interpolation(a, b, alpha))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_interpolate_files_and_out(tmp_path, alpha):
    a, b = _pair()
    pa, pb = tmp_path / "zeroshot.safetensors", tmp_path / "finetuned.safetensors"
    fastsoup.save(a, pa)
    fastsoup.save(b, pb)
    expected = _reference_interpolation(a, b, alpha)
    _check(interpolate(str(pa), str(pb), alpha), expected)
    _check(interpolate(pa, b, alpha), expected)  # mixed sources, PathLike
    out = tmp_path / f"wise-{alpha}.safetensors"
    assert interpolate(pa, pb, alpha, out=out) == str(out)
    ck = fastsoup.open_checkpoint(out)
    _check({n: ck.tensor(n) for n in ck}, expected)
    with pytest.raises(fastsoup.OutputExistsError):
        interpolate(pa, pb, alpha, out=out)


def test_interpolate_endpoints_and_midpoint():
    a, b = _pair()
    _check(interpolate(a, b, 0), a)
    _check(interpolate(a, b, 1), {n: (b[n] if t.is_floating_point() else t) for n, t in a.items()})
    mid = interpolate(a, b, 0.5)
    assert torch.allclose(mid["layer.weight"], (a["layer.weight"] + b["layer.weight"]) / 2, rtol=0, atol=1e-6)


def test_interpolate_options():
    a, b = _pair()
    got = interpolate(a, b, 0.25, dtype="fp16")
    assert got["layer.weight"].dtype == torch.float16 and got["steps"].dtype == torch.int64
    assert bits_equal(got["layer.weight"], _reference.weighted_sum([a["layer.weight"], b["layer.weight"]],
                                                                    [0.75, 0.25], torch.float16))


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), "nan"])
def test_interpolate_rejects_non_finite_alpha(alpha):
    a, b = _pair()
    with pytest.raises(ValueError, match="alpha"):
        interpolate(a, b, alpha)


def test_interpolate_rejects_mismatched_checkpoints():
    a, b = _pair()
    b["layer.bias"] = torch.zeros(34)
    with pytest.raises(fastsoup.CheckpointError):
        interpolate(a, b, 0.5)


# ---------------------------------------------------------------------------------------------------
# wise_ft_sweep

D, C = 10, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, 16)
        self.fc2 = nn.Linear(16, C)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _data(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, D, generator=g) + shift
    y = (x @ w.T + 0.5 * torch.randn(n, C, generator=g)).argmax(1)
    return [(x[i:i + 40], y[i:i + 40]) for i in range(0, n, 40)]


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory, _one_thread):
    """A 'zero-shot' model (the init) and a fine-tuned one, as files."""
    root = tmp_path_factory.mktemp("wise")
    torch.manual_seed(0)
    model = Net()
    zero = {n: t.detach().clone() for n, t in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for x, y in _data(400, 1) * 3:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    ft = {n: t.detach().clone() for n, t in model.state_dict().items()}
    pz, pf = root / "zeroshot.safetensors", root / "finetuned.safetensors"
    fastsoup.save(zero, pz)
    fastsoup.save(ft, pf)
    return str(pz), str(pf)


def _accuracy(sd, batches) -> float:
    model = Net()
    model.load_state_dict(sd)
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def _counting_model(calls):
    model = Net()
    forward = model.forward

    def counted(x):
        calls.append(1)
        return forward(x)

    model.forward = counted
    return model


def _load(path):
    ck = fastsoup.open_checkpoint(path)
    return {n: ck.tensor(n) for n in ck}


def test_wise_ft_sweep_scores(endpoints):
    pz, pf = endpoints
    held, other = _data(200, 2), _data(120, 3, shift=0.7)
    calls: list = []
    r = wise_ft_sweep(pz, pf, _counting_model(calls), held, alphas=[0, 0.5, 1], evals={"other": other}, progress=False)
    assert isinstance(r, SweepResult)
    assert r.alphas == [0.0, 0.5, 1.0] and r.sources == [pz, pf]
    assert set(r.scores) == {"heldout", "other"}
    assert len(calls) == 3 * (len(held) + len(other))  # each alpha evaluated once on each set
    for name, data in (("heldout", held), ("other", other)):
        s = r.scores[name]
        assert len(s) == 3
        assert s[0] == _accuracy(_load(pz), data)
        assert s[2] == _accuracy(_load(pf), data)
        assert s[1] == _accuracy(interpolate(pz, pf, 0.5), data)
    # the fine-tune learned something, so the sweep is not trivially flat
    assert r.scores["heldout"][2] > r.scores["heldout"][0]
    best = max(range(3), key=lambda i: (r.scores["heldout"][i], -i))
    assert r.best_alpha == r.alphas[best]
    _check(r.state_dict(), interpolate(pz, pf, r.best_alpha))
    _check(r.state_dict(0.5), interpolate(pz, pf, 0.5))


def test_wise_ft_sweep_best_alpha_is_the_first_on_ties(endpoints):
    pz, _ = endpoints
    r = wise_ft_sweep(pz, pz, Net(), _data(80, 2), alphas=[0.3, 0.0, 1.0], progress=False)
    assert r.scores["heldout"][0] == r.scores["heldout"][1] == r.scores["heldout"][2]
    assert r.best_alpha == 0.3


def test_wise_ft_sweep_cache(endpoints, tmp_path):
    pz, pf = endpoints
    held, other = _data(200, 2), _data(120, 3, shift=0.7)
    per_point = len(held) + len(other)
    cache = tmp_path / "cache"
    calls: list = []
    r1 = wise_ft_sweep(pz, pf, _counting_model(calls), held, alphas=[0, 0.5, 1], evals={"other": other},
                       cache_dir=cache, progress=False)
    assert len(calls) == 3 * per_point
    calls.clear()
    r2 = wise_ft_sweep(pz, pf, _counting_model(calls), held, alphas=[0, 0.5, 1], evals={"other": other},
                       cache_dir=cache, progress=False)
    assert calls == []  # a rerun evaluates nothing
    assert r2.scores == r1.scores and r2.best_alpha == r1.best_alpha
    r3 = wise_ft_sweep(pz, pf, _counting_model(calls), held, alphas=[0, 0.25, 0.5, 1], evals={"other": other},
                       cache_dir=cache, progress=False)
    assert len(calls) == per_point  # only the new point
    assert [r3.scores[d][i] for d in r1.scores for i in (0, 2, 3)] == [v for d in r1.scores for v in r1.scores[d]]
    assert r3.scores["heldout"][1] == _accuracy(interpolate(pz, pf, 0.25), held)


def test_wise_ft_sweep_extrapolation_and_errors(endpoints):
    pz, pf = endpoints
    held = _data(80, 2)
    r = wise_ft_sweep(pz, pf, Net(), held, alphas=[1.5, -0.5], progress=False)
    expected = [_accuracy(interpolate(pz, pf, a), held) for a in (1.5, -0.5)]
    assert r.scores["heldout"] == expected
    with pytest.raises(ValueError, match="alphas"):
        wise_ft_sweep(pz, pf, Net(), held, alphas=[], progress=False)
    assert len(DEFAULT_ALPHAS) == 11 and DEFAULT_ALPHAS[0] == 0.0 and math.isclose(DEFAULT_ALPHAS[-1], 1.0)
