"""The merge benchmark suite: fastsoup against the read bound, the naive torch recipes and mergekit,
side by side in one run, on generated ViT-like checkpoints.

    python -m benchmarks.run [--suite quick|full] [--out benchmarks/RESULTS.md] [--workdir DIR] [--clean]

Suites (hot page cache: every input is re-read with `cat` right before every run; every contender
runs in a fresh process of its own; rounds are interleaved, one run of every contender per round;
medians, with the minimum beside them):
  quick  ViT-S/16 fp16 (sharded safetensors and torch .bin) and bf16 (sharded), K = 4; K = 2, 4, 8 on
         ViT-S/16 fp16; median of 3; under 2 minutes on a 2-vCPU machine (fastsoup from .bin files and
         mergekit: full suite only).
  full   ViT-B/16 and ViT-L/14, fp16 and bf16, K = 8, sharded safetensors, and torch .bin (all but
         ViT-L bf16; mergekit's linear merge on the fp16 ones); K = 2, 4, 8, 16, 32 on ViT-B/16 fp16;
         the ViT-G/14 scale: K = 4 x 3.7 GB fp16 sharded, fastsoup against the naive recipe; median of
         5 (of 3 for the naive recipe on ViT-G: 20-50 s a run). About 25 minutes on a 2-vCPU machine, ~39 GB of generated checkpoints (made once,
         kept in --workdir; --clean deletes them).

Contenders:
  bound                  `cat` of every input file to /dev/null + writing a buffer of the output's size
  bound_parallel         the same with all inputs read concurrently; "x bound" is against the faster one
  fastsoup               fastsoup.average(paths, out=...), sharded safetensors in (timed in the process)
  fastsoup (.bin)        the same from the torch .bin files
  fastsoup CLI           `fastsoup average IN... -o OUT`, the whole process (interpreter start included)
  fastsoup CUDA          fastsoup.average(..., device="cuda"), when fastsoup.native_info() says CUDA is there
  naive safetensors      load_file each input, acc += t.float(), divide, cast, save_file (torch's
                         default threads; and "1 thread": the same after torch.set_num_threads(1), which
                         is far faster when another process keeps a CPU busy; "vs naive" is against the
                         faster of the two)
  naive torch.load       the same from .bin files with torch.load, and with torch.load(mmap=True)
  mergekit linear        `mergekit-pytorch` with a `linear` config on the .bin files, the whole process
                         (when mergekit-pytorch is found: --mergekit-pytorch, PATH, /tmp/mkvenv/bin)
Correctness after timing: fastsoup's output against the naive recipe's (and mergekit's), max ulp.

Writes the Markdown between <!-- benchmarks.run:begin --> and <!-- benchmarks.run:end --> in --out
(markers appended if missing; nothing else in the file is touched), and benchmarks/results/suite-SUITE
.json/.md/.png (raw figures, the same Markdown, and the plot of throughput and peak RSS against K).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import time

from .harness import RESULTS_DIR, command_line, machine, write_between_markers, write_json, write_text
from .merge import find_mergekit, mergekit_version
from .suite.cases import SUITES, bench_case, bench_scaling, make_data
from .suite.report import BEGIN, END, markdown, plot

DEFAULT_WORKDIR = "/tmp/fastsoup-suite"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), help="default: quick (with --clean alone: clean and exit)")
    ap.add_argument("--out", help="Markdown file to write the results into, between the suite's markers")
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR, help="generated checkpoints (kept between runs)")
    ap.add_argument("--clean", action="store_true", help="delete --workdir (then run the suite only if --suite is given)")
    ap.add_argument("--runs", type=int, help="rounds per measurement (default: the suite's; at least 3)")
    ap.add_argument("--giant-naive-runs", type=int, help="runs of the naive recipes on the ViT-G case (full suite default: 3)")
    ap.add_argument("--mergekit-pytorch", help="mergekit's `mergekit-pytorch` (default: PATH, then /tmp/mkvenv/bin)")
    ap.add_argument("--no-mergekit", action="store_true")
    args = ap.parse_args(argv)

    if args.clean:
        if os.path.isdir(args.workdir):
            shutil.rmtree(args.workdir)
            print(f"deleted {args.workdir}")
        if args.suite is None:
            return 0
    suite_name = args.suite or "quick"
    suite = SUITES[suite_name]
    runs = args.runs or suite.runs
    if runs < 3:
        ap.error("--runs must be at least 3 (medians)")
    t_start = time.perf_counter()
    command = command_line("python -m benchmarks.run", argv)
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")

    mach = machine()
    cuda = mach["cuda_available"]
    print("CUDA: " + ("available: fastsoup CUDA rows included" if cuda else "not available on this machine"), flush=True)
    mk_exe = None if args.no_mergekit else find_mergekit(args.mergekit_pytorch)
    want_mk = any(c.mergekit for c in suite.cases)
    if not want_mk:
        mk_note = "not in this suite (the full suite runs it)"
    elif args.no_mergekit:
        mk_note = "skipped (--no-mergekit)"
    elif mk_exe is None:
        mk_note = "not installed: skipped (install it in a venv of its own, see benchmarks/bench_mergekit.py)"
    else:
        mk_note = f"mergekit {mergekit_version(mk_exe)}, `{mk_exe}`"
    print("mergekit: " + mk_note, flush=True)

    zoos = make_data(args.workdir, suite)
    res = {"suite": suite_name, "command": command, "date": date, "machine": mach, "mergekit": mk_note,
           "workdir": args.workdir, "cases": []}
    for case in suite.cases:
        print(f"== {case.config} {case.dtype} K={case.k}, median of {runs}", flush=True)
        res["cases"].append(bench_case(case, zoos, args.workdir, runs, mk_exe if want_mk else None, cuda))
    sc_cfg, sc_dt, sc_ks = suite.scaling
    print(f"== scaling: {sc_cfg} {sc_dt} K={sc_ks}, median of {runs}", flush=True)
    given = {c["case"]["k"]: c["table"] for c in res["cases"]
             if (c["case"]["config"], c["case"]["dtype"]) == (sc_cfg, sc_dt) and c["case"]["k"] in sc_ks}
    res["scaling"] = bench_scaling(sc_cfg, sc_dt, sc_ks, zoos, args.workdir, runs, given)
    if suite.giant:
        g = suite.giant
        limit = dict(suite.giant_runs)
        if args.giant_naive_runs:
            if args.giant_naive_runs < 3:
                ap.error("--giant-naive-runs must be at least 3 (medians)")
            limit = {"naive_safetensors": args.giant_naive_runs, "naive_safetensors_1t": args.giant_naive_runs}
        limit = {k: v for k, v in limit.items() if v < runs} or None
        print(f"== {g.config} {g.dtype} K={g.k}, median of {runs}" + (f" (naive: {limit['naive_safetensors']})" if limit else ""),
              flush=True)
        res["giant"] = bench_case(g, zoos, args.workdir, runs, None, cuda, limit)
    res["wall_seconds"] = time.perf_counter() - t_start

    os.makedirs(RESULTS_DIR, exist_ok=True)
    json_path = os.path.join(RESULTS_DIR, f"suite-{suite_name}.json")
    png_path = os.path.join(RESULTS_DIR, f"suite-{suite_name}.png")
    md_path = os.path.join(RESULTS_DIR, f"suite-{suite_name}.md")
    plot(res, png_path)
    write_json(json_path, res)
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else RESULTS_DIR
    md = markdown(res, os.path.relpath(png_path, out_dir), os.path.relpath(json_path, out_dir))
    write_text(md_path, markdown(res, os.path.basename(png_path), os.path.basename(json_path)))
    if args.out:
        write_between_markers(args.out, md, BEGIN, END)
    print()
    print(md)
    print(f"suite wall time: {res['wall_seconds']:.1f} s; wrote {json_path}, {png_path}, {md_path}"
          + (f" and {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
