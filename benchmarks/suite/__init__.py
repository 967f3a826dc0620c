"""The merge suite's parts (benchmarks.run): its cases and their runs, and its report."""
