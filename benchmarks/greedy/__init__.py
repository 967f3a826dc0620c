"""The greedy-soup benchmark's parts (bench_greedy.py and compare_builds.py --bench greedy): data,
model and ingredients, contenders, checks and analysis, report; child.py runs fastsoup's search
alone in a process of its own (for another source tree's fastsoup)."""
