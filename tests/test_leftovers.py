"""The check that no test leaves files outside its tmp path (``conftest.pytest_sessionfinish``)
itself: it sees a file planted in a watched place, and a run of a test that leaves one fails."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import conftest

TIMEOUT = 300  # seconds for one subprocess: a hang fails the test instead of blocking CI


def test_the_snapshot_sees_new_files_but_not_build_products(tmp_path):
    (tmp_path / "build").mkdir()
    (tmp_path / "keep.txt").write_text("x")
    before = conftest.tree_snapshot(str(tmp_path))
    (tmp_path / "build" / "obj.o").write_text("x")  # a build product: ignored
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "stray.safetensors").write_text("x")  # what a careless test leaves
    assert conftest.tree_snapshot(str(tmp_path)) - before == {"stray.safetensors"}


def test_a_test_that_leaves_a_file_in_the_current_folder_fails_the_run(tmp_path):
    (tmp_path / "conftest.py").write_text(open(conftest.__file__).read())
    (tmp_path / "test_careless.py").write_text(textwrap.dedent("""
        def test_writes_into_cwd():
            open("soup.safetensors", "w").write("oops")
    """))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_careless.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
                       env=dict(os.environ, PYTHONPATH=os.path.dirname(conftest.ROOT) + os.pathsep + conftest.ROOT))
    assert r.returncode != 0 and "left 1 file(s) outside their tmp paths" in r.stdout, r.stdout[-2000:]
    assert "soup.safetensors" in r.stdout
