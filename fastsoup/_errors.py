"""The exceptions fastsoup raises. One root: :class:`FastsoupError`.

    FastsoupError
    ├── ArgumentError (also a ValueError)        a bad value of an argument or option
    │   └── MergeConfigError                     a merge config (mergekit YAML) fastsoup cannot run
    ├── ArgumentTypeError (also a TypeError)     an argument of the wrong type
    ├── CheckpointError (also a ValueError)      a checkpoint unreadable, or not matching the others
    │   ├── InputChangedError                    an input changed while it was read
    │   └── FusedLayoutError                     model and file tensors do not correspond one to one
    ├── DataError (also a ValueError)            a held-out or eval set that cannot be used
    ├── CacheMismatchError (also a ValueError)   a cache written for another model or data set
    ├── OutputExistsError (also a FileExistsError)   ``out`` exists and ``overwrite`` is False
    ├── UnsafeOutputError (also a ValueError)    ``overwrite`` may not replace what is at ``out``
    └── DistributedError                         another rank failed, or the ranks disagree

Each subclass is also the built-in exception a caller would expect in its place (``except ValueError``
keeps catching a bad weight), so code written against the built-in types keeps working. An error
fastsoup raises on purpose is always a FastsoupError; any other exception out of fastsoup is a bug
(or comes from the user's own code: a model, a data loader).
"""

from __future__ import annotations


class FastsoupError(Exception):
    """Root of every error fastsoup raises on purpose."""


class ArgumentError(FastsoupError, ValueError):
    """An argument or option has a value fastsoup cannot use: weights (not finite, summing to zero,
    not one per ingredient), a device, threads, an order, ``reorder``, ``metric``, ``verify``, a
    shard size, a dtype, an ``init``, a key map's pattern, a command line option... The message names
    the argument and what it takes."""


class MergeConfigError(ArgumentError):
    """A merge config cannot be read or asks for something fastsoup does not do. The message names
    the file and the key."""


class ArgumentTypeError(FastsoupError, TypeError):
    """An argument is of the wrong type (a model that is not an ``nn.Module``, a key map that does not
    map strings to strings, a ``key`` that is not a string...). The message names the argument."""


class CheckpointError(FastsoupError, ValueError):
    """A checkpoint cannot be read or does not fit the others.

    The message always names the file (or in-memory source) and, where one is at fault, the tensor.
    """


class DataError(FastsoupError, ValueError):
    """A held-out or eval data set cannot be used: not ``(inputs, labels)`` batches, empty, labels
    that are not one per example, or a stored held-out set that is missing or damaged. The message
    names the data set (and the batch)."""


class CacheMismatchError(FastsoupError, ValueError):
    """The model or a data set is not the one a cache directory was written for."""


class OutputExistsError(FastsoupError, FileExistsError):
    """The output path exists and ``overwrite`` was not given."""


class InputChangedError(CheckpointError):
    """An input file changed while fastsoup read it: rewritten, truncated, or unreadable. Nothing that
    was computed from it is installed, cached or returned. The message names the file."""


class UnsafeOutputError(FastsoupError, ValueError):
    """``overwrite`` was given, but the output path holds something fastsoup may not replace: a
    folder with files it did not write, an input, or the current folder or one of its ancestors."""


class DistributedError(FastsoupError):
    """Under torch.distributed: another rank failed (``rank`` and ``error_type`` say which and how),
    or the ranks disagree (different data, different outputs planned)."""

    def __init__(self, message: str, *, rank: int | None = None, error_type: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.error_type = error_type


class MatplotlibMissing(FastsoupError):
    """A figure needs matplotlib, which is not installed (the message has the pip command)."""


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
