"""fastsoup against mergekit (the popular LLM merging tool) on Hugging Face Llama-style folders.

    python -m benchmarks.bench_mergekit [--mergekit-yaml PATH] [--k 8] [--runs 5]

mergekit is optional and heavy (transformers, accelerate, ...): install it in a virtualenv of its
own and point --mergekit-yaml at its `mergekit-yaml` (default: the one on PATH), e.g.
    python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit
Without it the benchmark prints a note and exits 0.

The K models share one config.json made by transformers' LlamaConfig (from mergekit's own
environment) and random fp16 weights (a shared init plus a perturbation each), ~0.64 GB each.
Both tools run as whole processes on a hot page cache, median of --runs, and their outputs are
compared afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess

import torch

import fastsoup

from .harness import fastsoup_cli, rounds, run_timed, warm, write_json
from .merge import max_ulp_diff

LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048)


def llama_shapes(c):
    d, m, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (d, d)
        shapes[p + "mlp.gate_proj.weight"] = (m, d)
        shapes[p + "mlp.up_proj.weight"] = (m, d)
        shapes[p + "mlp.down_proj.weight"] = (d, m)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (v, d)
    return shapes


def make_models(folder, k, mk_python):
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"llama-{i:02d}") for i in range(k)]
    if all(os.path.exists(os.path.join(p, "config.json")) for p in paths):
        return paths
    cfg_dir = os.path.join(folder, "_config")
    code = ("import sys; from transformers import LlamaConfig; "
            f"LlamaConfig(**{LLAMA!r}, torch_dtype='float16', tie_word_embeddings=False, "
            "architectures=['LlamaForCausalLM']).save_pretrained(sys.argv[1])")
    subprocess.run([mk_python, "-c", code, cfg_dir], check=True)
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=g) * 0.02 for n, s in llama_shapes(LLAMA).items()}
    for i, p in enumerate(paths):
        gi = torch.Generator().manual_seed(i + 1)
        sd = {n: (t + torch.randn(t.shape, generator=gi) * 0.002).half() for n, t in base.items()}
        fastsoup.save(sd, p, shard_size="5GB", overwrite=True)
        shutil.copy(os.path.join(cfg_dir, "config.json"), os.path.join(p, "config.json"))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit-yaml", default=shutil.which("mergekit-yaml"))
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--data", default="/tmp/fastsoup-bench/llama")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not args.mergekit_yaml or not os.path.exists(args.mergekit_yaml):
        print("mergekit is not installed: skipped (see this script's docstring to install it in a venv of its own)")
        return 0
    mk_python = os.path.join(os.path.dirname(args.mergekit_yaml), "python")
    paths = make_models(args.data, args.k, mk_python)
    in_bytes = sum(os.path.getsize(os.path.join(p, f)) for p in paths for f in os.listdir(p) if f.endswith(".safetensors"))
    config = os.path.join(args.data, "linear.yml")
    with open(config, "w") as f:
        f.write("merge_method: linear\ndtype: float16\nmodels:\n")
        for p in paths:
            f.write(f"  - model: {p}\n    parameters:\n      weight: 1.0\n")
    mk_out, fs_out = os.path.join(args.data, "out-mergekit"), os.path.join(args.data, "out-fastsoup")

    def run(cmd, out):
        def fn():
            shutil.rmtree(out, ignore_errors=True)
            warm(paths)
            return {"seconds": run_timed(cmd)}
        return fn

    table, _ = rounds({
        "mergekit-yaml linear": run([args.mergekit_yaml, config, mk_out, "--no-copy-tokenizer", "--quiet",
                                     "--no-write-model-card"], mk_out),
        "fastsoup average": run([*fastsoup_cli(), "average", *paths, "-o", fs_out, "--no-progress"], fs_out),
    }, args.runs)
    times = {k: v["runs"] for k, v in table.items()}
    # Correctness: the two soups, tensor by tensor (mergekit sums in float32 and normalizes the weights).
    worst = max_ulp_diff(fs_out, mk_out)
    med = {k: v["seconds"] for k, v in table.items()}
    print(f"# {args.k} Llama-style fp16 models, {in_bytes / args.k / 1e9:.2f} GB each; whole processes, hot cache, "
          f"median of {args.runs}")
    print("| tool | seconds (median) | min | GB/s of input | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.2f} | {min(v):.2f} | {in_bytes / med[k] / 1e9:.1f} | "
              f"{med['mergekit-yaml linear'] / med[k]:.1f}× |")
    print(f"outputs differ by at most {worst} ulp (fp16)")
    if args.json:
        write_json(args.json, {"k": args.k, "input_bytes": in_bytes, "times": times, "median": med, "max_ulp": worst})
    for out in (mk_out, fs_out):
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
