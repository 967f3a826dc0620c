"""Where the engine computes: :class:`Device` and :func:`resolve_device`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._errors import ArgumentError
from .._native import _core


@dataclass(frozen=True)
class Device:
    """Where the engine computes: ``Device("cpu")`` or ``Device("cuda", index)``."""

    type: str = "cpu"
    index: int = 0

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.is_cuda else "cpu"


CPU = Device()


def resolve_device(device: Any) -> Device:
    """"cpu", "cuda", "cuda:N" or a torch.device -> :class:`Device`, checking that CUDA is usable."""
    if device is None or isinstance(device, Device):
        return device or CPU
    text = str(device)
    if text == "cpu":
        return CPU
    if text == "cuda" or text.startswith("cuda:"):
        if not _core.cuda_compiled:
            raise ArgumentError(f"device={device!r}: this build of fastsoup has no CUDA (reinstall where nvcc is found)")
        count = _core.cuda_device_count()
        if count == 0:
            raise ArgumentError(f"device={device!r}: no CUDA device is visible to this process")
        if text == "cuda":
            from .. import _torch

            index = _torch.current_cuda_index()
        else:
            try:
                index = int(text.split(":", 1)[1])
            except ValueError:
                raise ArgumentError(f"device={device!r}: expected 'cuda' or 'cuda:N'") from None
        if not 0 <= index < count:
            raise ArgumentError(f"device={device!r}: {count} CUDA device(s) visible")
        return Device("cuda", index)
    raise ArgumentError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'")

