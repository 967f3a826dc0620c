import pytest

import fastsoup


def bits_equal(a, b) -> bool:
    """Same dtype, shape and bytes (so -0.0 != +0.0 and NaN payloads count)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.fixture(params=fastsoup._core.supported_isas())
def isa(request):
    """Runs a test once per CPU instruction set this machine supports (scalar, avx2, avx512)."""
    previous = fastsoup._core.isa()
    fastsoup._core.set_isa(request.param)
    yield request.param
    fastsoup._core.set_isa(previous)
