"""The CUDA engine's benchmark (needs a GPU; prints why not and exits 0 without one).

    python -m benchmarks.bench_cuda [--k 8] [--config vit-l14] [--runs 5] [--json FILE]

(a) kernel on device-resident inputs: fastsoup's fused weighted_sum over K fp16 tensors
    (``fastsoup.weighted_sum`` of one-tensor state dicts on the GPU, the public API: the output comes
    from torch's caching allocator, one untimed warm-up call first), in GB/s moved (K inputs read +
    one output written), against a cudaMemcpy device-to-device of the same bytes measured in the
    same run (target: >= 80 %);
(b) file -> GPU average of K ViT-like fp16 checkpoints (`fastsoup.average(paths, device="cuda")`,
    result left on the GPU) against the pinned host->device copy bandwidth and the page-cache read
    bandwidth measured in the same run (target: >= 70 % of the lower), and against the naive recipe
    on the GPU (`load_file(path, device="cuda")`, `acc += t.float()`; target: >= 5x).
Medians of --runs, hot page cache; correctness checked against the CPU engine after timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: python benchmarks/bench_cuda.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import input_files, machine, nbytes, timed, warm, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--config", default="vit-l14")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--elements", type=int, default=64 << 20, help="elements per input in (a)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fastsoup-bench-cuda"))
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import torch

    import fastsoup

    info = fastsoup.native_info()
    if not (info["cuda_available"] and torch.cuda.is_available()):
        print(f"bench_cuda: no GPU here (native_info: {info}); nothing to measure")
        return 0
    sync = torch.cuda.synchronize
    dev = torch.device("cuda")
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "k": args.k, "runs": args.runs,
              "machine": machine()}
    print(f"GPU: {result['gpu']}, torch {torch.__version__}, K = {args.k}, median of {args.runs}")

    # (a) device-resident kernel vs device-to-device copy of the same bytes.
    n = args.elements
    xs = [torch.randn(n, device=dev).half() for _ in range(args.k)]
    moved = (args.k + 1) * n * 2
    src = torch.empty(moved // 2, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t_copy, _ = timed(lambda: dst.copy_(src), args.runs, sync=sync)  # reads + writes moved // 2 each: moved bytes
    ws = [1.0 / args.k] * args.k
    sds = [{"t": x} for x in xs]
    t_kernel, _ = timed(lambda: fastsoup.weighted_sum(sds, ws, device="cuda", progress=False), args.runs, sync=sync,
                        warmup=1)
    result["a"] = {"kernel_GBps": moved / t_kernel / 1e9, "d2d_copy_GBps": moved / t_copy / 1e9,
                   "ratio": t_copy / t_kernel}
    print(f"(a) kernel {moved / t_kernel / 1e9:.0f} GB/s moved, device copy {moved / t_copy / 1e9:.0f} GB/s: "
          f"{100 * t_copy / t_kernel:.0f} % (target >= 80 %)")
    del xs, sds, src, dst
    torch.cuda.empty_cache()

    # (b) file -> GPU.
    from benchmarks.checkpoints import make_zoo

    paths = make_zoo(args.workdir, args.config, args.k, dtype=torch.float16, fmt="sharded", shard_size="250MB")
    in_bytes = nbytes(paths)

    warm(paths)
    t_read, _ = timed(lambda: warm(paths), args.runs)  # `cat` of the inputs from the page cache
    pinned = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    gpu_buf = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    t_h2d, _ = timed(lambda: gpu_buf.copy_(pinned, non_blocking=True), args.runs, sync=sync)
    h2d = (256 << 20) / t_h2d
    read = in_bytes / t_read
    bound = min(h2d, read)
    warm(paths)
    t_fs, _ = timed(lambda: fastsoup.average(paths, device="cuda"), args.runs, sync=sync)

    def naive():
        from safetensors.torch import load_file

        acc = None
        for p in files_by_model:
            sd = {}
            for f in p:
                sd.update(load_file(f, device="cuda"))
            if acc is None:
                acc = {k: v.float() for k, v in sd.items()}
            else:
                for k, v in sd.items():
                    acc[k] += v.float()
        return {k: (v / len(files_by_model)).half() for k, v in acc.items()}

    files_by_model = [[f for f in input_files([p]) if f.endswith(".safetensors")] for p in paths]
    warm(paths)
    t_naive, _ = timed(naive, max(3, args.runs // 2), sync=sync)
    result["b"] = {"input_GB": in_bytes / 1e9, "fastsoup_s": t_fs, "fastsoup_GBps": in_bytes / t_fs / 1e9,
                   "h2d_GBps": h2d / 1e9, "page_cache_read_GBps": read / 1e9, "ratio_to_bound": in_bytes / t_fs / bound,
                   "naive_s": t_naive, "speedup_vs_naive": t_naive / t_fs}
    print(f"(b) {in_bytes / 1e9:.2f} GB in: fastsoup {t_fs:.3f} s = {in_bytes / t_fs / 1e9:.1f} GB/s; pinned H2D "
          f"{h2d / 1e9:.1f} GB/s, page-cache read {read / 1e9:.1f} GB/s: {100 * in_bytes / t_fs / bound:.0f} % of the "
          f"lower (target >= 70 %); naive {t_naive:.3f} s: {t_naive / t_fs:.1f}x (target >= 5x)")

    # Correctness after timing.
    gpu = fastsoup.average(paths, device="cuda")
    cpu = fastsoup.average(paths)
    same = all(torch.equal(gpu[k].cpu().view(torch.uint8), cpu[k].view(torch.uint8)) for k in cpu)
    result["bit_identical_to_cpu"] = same
    print(f"GPU result bit-identical to the CPU engine: {same}")
    if args.json:
        write_json(args.json, result, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
