"""Small points a new user met (issue 20, parts 7 and 8): `--version`, help for every option, one
line for a `--device` torch cannot use, the demo's time said alike in `--help` and the README, the
summary a finished progress bar leaves, `inspect --tensors`, `check_compatible` of paths, the
license, and the README's install line for an existing environment."""

from __future__ import annotations

import argparse
import os
import re
import textwrap

import numpy as np
import pytest

import fastsoup
from fastsoup import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _pair(tmp_path, n=300_000):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    fastsoup.save({"w": np.ones(n, np.float32), "step": np.array([3], np.int64)}, a)
    fastsoup.save({"w": np.zeros(n, np.float32), "step": np.array([3], np.int64)}, b)
    return a, b


def test_check_compatible_takes_paths(tmp_path):
    a, b = _pair(tmp_path)
    fastsoup.check_compatible([a, b])
    fastsoup.check_compatible([fastsoup.open_checkpoint(a), b])
    c = str(tmp_path / "c.safetensors")
    fastsoup.save({"w": np.zeros(7, np.float32)}, c)
    with pytest.raises(fastsoup.CheckpointError, match=r"c\.safetensors: tensor 'w': shape \[7\]") as e:
        fastsoup.check_compatible([a, c])
    assert "tensor names differ" in str(e.value)  # 'step' is missing there too: every problem listed
    with pytest.raises(fastsoup.CheckpointError, match="no ingredients"):
        fastsoup.check_compatible([])

