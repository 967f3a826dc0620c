"""fastsoup's benchmarks (a package: run them with ``python -m benchmarks.NAME``; bench_greedy.py and
compare_builds.py also as scripts). They use only fastsoup's public API and the ``fastsoup``
command, so the same code times older builds too (compare_builds.py).

- harness.py: the one harness: rounds and their figures, the page cache, machine info, child
  processes (this tree's or another source tree's fastsoup), peak RSS, writing results;
- run.py (the merge suite; its cases and report in suite/), bench_merge.py (one model, cold runs,
  peak RSS in K, kernel alone), merge.py (the merge contenders as the drivers run them) and
  _contenders.py (each in a process of its own), checkpoints.py (generated ViT-like checkpoints);
- bench_greedy.py (greedy soup against the official loop; its parts in greedy/), _official_greedy.py;
- compare_builds.py (two source trees side by side: the merge or the greedy search);
- bench_cuda.py + gpu_check.sh, bench_mergekit.py, bench_precision.py, bench_write.py,
  demo_average.py; test_merge_bench.py (pytest-benchmark: ``pytest benchmarks/ --benchmark-only``).

Nothing here may import at package import time: compare_builds registers this package by its path
in interpreters whose fastsoup comes from another tree.
"""
