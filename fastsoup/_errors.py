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


class InputChangedError(CheckpointError):
    """An input file changed while fastsoup read it: rewritten, truncated, or unreadable. Nothing that
    was computed from it is installed, cached or returned. The message names the file."""


class UnsafeOutputError(FastsoupError, ValueError):
    """``overwrite`` was given, but the output path holds something fastsoup may not replace: a
    folder with files it did not write, an input, or the current folder or one of its ancestors."""


class InterruptedAfterInstall(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM/SIGHUP) arrived after the output was installed, while the output it
    replaced was being removed: the new output is complete at its path. The message says where the
    rest of the old one is (the next run beside it removes it)."""


class StateDictChoiceWarning(UserWarning):
    """A training checkpoint holds several state dicts (e.g. ``state_dict`` and ``state_dict_ema``)
    and fastsoup took one by its default rule. ``taken`` is the entry taken, ``others`` the other
    state dicts, ``source`` the checkpoint; pass ``key=`` (CLI: ``--key``) to take another."""

    def __init__(self, message: str, *, source: str, taken: str, others: tuple):
        super().__init__(message)
        self.source = source
        self.taken = taken
        self.others = tuple(others)
