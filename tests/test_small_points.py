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


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastsoup {fastsoup.__version__}"


def test_every_option_has_a_description():
    missing = []
    for name, sub in _subparsers(cli._parser()).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    def net():
        torch.manual_seed(0)
        return nn.Linear(4, 2)

    def heldout():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g))]
''')


@pytest.fixture
def tiny(tmp_path):
    torch = pytest.importorskip("torch")
    (tmp_path / "tinymod.py").write_text(MODULE)
    torch.manual_seed(0)
    paths = []
    for i in range(2):
        sd = {k: v.detach().clone() + i for k, v in torch.nn.Linear(4, 2).state_dict().items()}
        p = str(tmp_path / f"ft{i}.safetensors")
        fastsoup.save(sd, p)
        paths.append(p)
    return tmp_path, str(tmp_path / "tinymod.py"), paths


# cuda:99 fails on every machine: without CUDA in torch, without a GPU, and with fewer GPUs.
@pytest.mark.parametrize("command", ["greedy", "learned"])
@pytest.mark.parametrize("device", ["cuda:99", "gpu"])
def test_unusable_device_is_one_line(tiny, capsys, command, device):
    root, mod, paths = tiny
    rc = cli.main([command, *paths, "--model", f"{mod}:net", "--heldout", f"{mod}:heldout",
                   "-o", str(root / "out.safetensors"), "--device", device, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"fastsoup: error: --device {device}: ") and err.count("\n") == 1, err
    assert not os.path.exists(root / "out.safetensors")


def test_demo_time_is_the_same_in_help_and_readme():
    demo = _subparsers(cli._parser())["demo"]
    top = cli._parser().format_help()
    assert cli.DEMO_SECONDS in re.sub(r"\s+", " ", top)
    assert cli.DEMO_SECONDS in re.sub(r"\s+", " ", demo.format_help())
    readme = re.sub(r"\s+", " ", _read("README.md"))
    assert f"`fastsoup demo --out demo_out`, the paper's experiment in miniature ({cli.DEMO_SECONDS}" in readme
    assert "~1 minute" not in top


def _pair(tmp_path, n=300_000):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    fastsoup.save({"w": np.ones(n, np.float32), "step": np.array([3], np.int64)}, a)
    fastsoup.save({"w": np.zeros(n, np.float32), "step": np.array([3], np.int64)}, b)
    return a, b


def test_finished_progress_bar_leaves_a_summary(tmp_path, capsys):
    a, b = _pair(tmp_path)
    fastsoup.average([a, b], out=str(tmp_path / "s.safetensors"), progress=True)
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert re.fullmatch(r"average: 2\.40 MB in \d+\.\d\d s \((\d+\.\d|-) GB/s\)", lines[-1]), err
    fastsoup.weighted_sum([a, b], [1, -1], out=str(tmp_path / "d.safetensors"), progress=True)
    assert re.search(r"weighted_sum: 2\.40 MB in ", capsys.readouterr().err)
    fastsoup.average([a, b], out=str(tmp_path / "q.safetensors"), progress=False)
    assert capsys.readouterr().err == ""  # no bar, no summary
    assert fastsoup.engine.progress_summary("average", 4_870_000_000, 0.61) == "average: 4.87 GB in 0.61 s (8.0 GB/s)"


def test_inspect_tensors_lists_names_shapes_dtypes(tmp_path, capsys):
    path = str(tmp_path / "m.safetensors")
    fastsoup.save({"encoder.weight": np.zeros((3, 4), np.float16), "encoder.bias": np.zeros(3, np.float32),
                   "steps": np.zeros((), np.int64)}, path)
    assert cli.main(["inspect", path, "--tensors"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:] if line.startswith("  ") and
            not line.startswith("    ") and line.split()[0] in ("encoder.weight", "encoder.bias", "steps")}
    assert rows == {"encoder.bias": ["[3]", "float32"], "encoder.weight": ["[3,", "4]", "float16"],
                    "steps": ["[]", "int64"]}
    assert cli.main(["inspect", path, "--tensors", "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert sorted((t["name"], t["shape"], t["dtype"]) for t in info["tensor_list"]) == [
        ("encoder.bias", [3], "float32"), ("encoder.weight", [3, 4], "float16"), ("steps", [], "int64")]
    assert cli.main(["inspect", path]) == 0
    assert "encoder.bias" not in capsys.readouterr().out  # the list only when asked


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


def test_license():
    text = _read("LICENSE")
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    pyproject = _read("pyproject.toml")
    assert re.search(r'^license = "Apache-2.0"$', pyproject, flags=re.M)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, flags=re.M)


def test_readme_install_line_takes_the_cpu_torch():
    """No bare `pip install torch` (it pulls a multi-GB CUDA build): a pinned version or an index."""
    for line in _read("README.md").splitlines():
        m = re.match(r"\s*pip install (torch\S*)(.*)", line)
        if m:
            assert "==" in m.group(1) or "--index-url" in m.group(2), line
