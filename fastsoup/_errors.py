"""The exceptions fastsoup raises. One root: :class:`FastsoupError`."""

from __future__ import annotations


class FastsoupError(Exception):
    """Root of every error fastsoup raises on purpose."""


class CheckpointError(FastsoupError, ValueError):
    """A checkpoint cannot be read or does not fit the others.

    The message always names the file (or in-memory source) and, where one is at fault, the tensor.
    """


class OutputExistsError(FastsoupError, FileExistsError):
    """The output path exists and ``overwrite`` was not given."""
