"""The ``fastsoup`` command line.

    fastsoup average IN [IN ...] -o OUT [--weights W ...] [--dtype {fp16,bf16,fp32}] [--key KEY]
                     [--shard-size 5GB] [--threads N] [--no-progress] [--overwrite] [--fsync] [--config-from PATH]
                     [--strip-prefix PREFIX] [--rename REGEX=REPLACEMENT ...]
    fastsoup merge --method {task_arithmetic,ties,dare_linear,dare_ties,breadcrumbs,breadcrumbs_ties,slerp,
                             model_stock,linear} [--base BASE] IN [IN ...] -o OUT
                   [--weights W ...] [--lambda L] [--t T] [--[no-]normalize] [--density D] [--gamma G]
                   [--rescale {none,l1,density}] [--seed S] [average's options]
    fastsoup merge CONFIG.yml -o OUT [--seed S] [average's options]
    fastsoup greedy CKPT [CKPT ...] --model MOD:FACTORY --heldout MOD:LOADER [--eval NAME=MOD:LOADER ...]
                    -o OUT [--cache DIR] [--verify-cache] [--strict] [--device DEV] [--results PATH] [--key KEY]
                    [--overwrite] [--config-from PATH] [--strip-prefix PREFIX] [--rename REGEX=REPLACEMENT ...]
    fastsoup plot RESULTS.jsonl -o FIG.png [--x heldout] [--y NAME ...] [--title TEXT]
    fastsoup learned CKPT [CKPT ...] --model MOD:FACTORY --heldout MOD:LOADER [--eval NAME=MOD:LOADER ...]
                     -o OUT [--layerwise] [--epochs N] [--lr LR] [--parametrization {softmax,free}] [--cache DIR]
                     [--verify-cache] [--key KEY] [--config-from PATH] [--strip-prefix PREFIX] [--rename ...]
    fastsoup inspect PATH [--tensors] [--json] [--key KEY]
    fastsoup similarity CKPT [CKPT ...] [--base B] [--angles] [--plot PNG] [--key KEY]
    fastsoup analyze landscape A B C --model MOD:FACTORY [--heldout MOD:LOADER] -o OUT.jsonl [--steps 21]
                     [--span LO HI] [analyze's options]
    fastsoup analyze interpolate A B ... [--steps 21 | --alphas ALPHA ...]
    fastsoup analyze pairs CKPT [CKPT ...] --base BASE ...
    fastsoup analyze ensemble-vs-soup CKPT [CKPT ...] ...
    fastsoup analyze count CKPT [CKPT ...] [--strict] ...
        analyze's options: [--eval NAME=MOD:LOADER ...] [--png PNG | --no-plot] [--cache DIR] [--verify-cache]
                           [--device DEV] [--key KEY] [--no-progress] [--overwrite] [--strip-prefix PREFIX]
                           [--rename REGEX=REPLACEMENT ...]
    fastsoup demo [--out DIR] [--models N] [--seed S]
    fastsoup info
    fastsoup --version

fastsoup's errors (:class:`~fastsoup.FastsoupError` and its subclasses, and the OSError family: a
missing file, a full disk) are one line on stderr (no traceback) and exit code 1; nothing is left at
OUT. Any other exception is a bug, in the user's code (the ``--model`` factory, a ``--heldout`` or
``--eval`` loader, the model's forward) or in fastsoup: one line naming the user's function where it
was raised (``fastsoup: error in your model factory mypkg.models:make_net (called by fastsoup greedy):
ValueError: ...``), then the full traceback, and exit code 1. Notes (mixed input dtypes, LoRA factors
averaged separately) are one line each, ``fastsoup: note: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import threading
import time
import traceback
import warnings

from ._errors import ArgumentError, FastsoupError, OutputExistsError

# `time fastsoup demo --out DIR` on the 2-vCPU development machine, the whole command: 11.4 to 18.8 s (5 runs,
# load average 3.7 to 4.3 from other jobs), 9 to 10 s of CPU. Said alike in the README (Quick start).
DEMO_SECONDS = "10 to 20 s"
KEY_HELP = ("the state dict to take from training checkpoints (torch files that hold several entries), e.g. "
            "state_dict_ema for the EMA weights of timm's train.py (default: state_dict, else model)")
_CONFIG_FROM_HELP = ("the model folder (or a file in it) whose config, tokenizer, generation config, processor "
                     "configs, adapter config and model card a folder OUT gets (default: the first input's folder)")


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(prog="fastsoup", description="Fast, memory-bounded model soups.")
    p.add_argument("--version", action="version", version=f"fastsoup {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("average", help="average checkpoints (uniform or weighted) into one",
                       description="Average checkpoints: sum_k w_k * theta_k / sum_k w_k, streamed from disk.")
    if hasattr(a, "_negative_number_matcher"):  # --weights 0.5 -1e3: a negative number, not an option
        a._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
    a.add_argument("inputs", nargs="+", metavar="IN",
                   help=".safetensors files, sharded folders or index files, .pt/.bin files")
    a.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="output: a path ending in .safetensors for one file, .pt/.pth/.bin/.ckpt for one torch file, "
                        "else a folder (a model folder like the first input's)")
    a.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per input (default: uniform)")
    _output_options(a, "as the first input")

    m = sub.add_parser("merge", help="merge with a method (task arithmetic, TIES, DARE, breadcrumbs, SLERP, Model "
                                     "Stock) or a mergekit config",
                       description="Merge checkpoints with a merge method, or run a mergekit YAML config "
                                   "(fastsoup merge CONFIG.yml -o OUT [--seed S]).")
    if hasattr(m, "_negative_number_matcher"):
        m._negative_number_matcher = a._negative_number_matcher
    m.add_argument("inputs", nargs="+", metavar="IN", help="the models (not the base), or one CONFIG.yml")
    m.add_argument("-o", "--out", required=True, metavar="OUT", help="output, as for average")
    m.add_argument("--method", help="task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, "
                                    "slerp, model_stock or linear")
    m.add_argument("--base", metavar="BASE", help="the base model (all but linear; slerp: optional, "
                                                  "interpolates the task vectors)")
    m.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per input")
    m.add_argument("--lambda", dest="lam", type=float, metavar="L", help="task arithmetic's scale (default 1)")
    m.add_argument("--t", type=float, metavar="T", help="slerp's position (0: the first input)")
    m.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="divide by the sum of the weights (default: the method's; --no-normalize for ties' sum)")
    m.add_argument("--density", type=float, metavar="D", help="the sparse methods' density (default 1)")
    m.add_argument("--gamma", type=float, metavar="G", help="breadcrumbs' top fraction dropped (default 0.01)")
    m.add_argument("--rescale", choices=["none", "l1", "density"],
                   help="the sparse methods' rescale of the kept entries (default: density for DARE, none else)")
    m.add_argument("--seed", type=int, metavar="S", help="DARE's seed (default 0; also with a CONFIG.yml)")
    _output_options(m, "as the base")

    g = sub.add_parser(
        "greedy", help="greedy soup (paper's Recipe 1) with cached logits, plus uniform soup and ensembles",
        description="Greedy soup: rank the checkpoints by held-out accuracy, add each to the soup if the held-out "
                    "accuracy does not drop (--strict: if it improves). Prints a table of every ingredient, the uniform "
                    "and greedy soups and the logit ensembles on the held-out set and each --eval set.")
    g.add_argument("inputs", nargs="+", metavar="CKPT", help="checkpoints fine-tuned from one init")
    g.add_argument("--model", required=True, metavar="MOD:FACTORY",
                   help="a function returning the nn.Module, e.g. mypkg.models:make_model (or path/file.py:make_model)")
    g.add_argument("--heldout", metavar="MOD:LOADER",
                   help="a function returning the held-out (inputs, labels) batches, e.g. a DataLoader; without it, "
                        "the held-out set stored in --cache by an earlier run (no data pipeline)")
    g.add_argument("--eval", action="append", default=[], metavar="NAME=MOD:LOADER",
                   help="another data set to report (repeatable), e.g. shift=mypkg.data:ood_loader")
    g.add_argument("-o", "--out", required=True, metavar="OUT", help="where to write the greedy soup (safetensors)")
    g.add_argument("--cache", metavar="DIR", help="logit cache and journal: reruns evaluate nothing, a killed run resumes")
    g.add_argument("--strict", action="store_true", help="keep a candidate only if it improves (the official main.py)")
    g.add_argument("--device", help="evaluation device: where the model and the held-out tensors are (the "
                                    "eval_device of greedy_soup; default: the model's); the soups are formed on "
                                    "it too when it is a GPU")
    g.add_argument("--results", metavar="PATH", help="results JSONL (default: results.jsonl in --cache, else next to OUT)")
    g.add_argument("--verify-cache", action="store_true",
                   help="key the cache by every byte of the checkpoints (reads them once more per run), not by file "
                        "identity and sampled content")
    g.add_argument("--key", metavar="KEY", help=KEY_HELP)
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    g.add_argument("--config-from", metavar="PATH", help=_CONFIG_FROM_HELP.replace("first input", "first kept input"))
    _name_options(g)

    pl = sub.add_parser("plot", help="the paper-style figure from a results.jsonl",
                        description="Individual models as points, soups and ensembles marked and named; x = held-out "
                                    "accuracy, one panel per other data set on y (default: every eval set). The axes "
                                    "are zoomed on the individual models; a point far off (a collapsed fine-tune) is "
                                    "drawn at the edge with its name and scores.")
    pl.add_argument("results", metavar="RESULTS.jsonl", help="the results file of fastsoup greedy")
    pl.add_argument("-o", "--out", required=True, metavar="FIG.png", help="where to write the figure (PNG)")
    pl.add_argument("--x", default="heldout", help="data set on the x axis (default: heldout)")
    pl.add_argument("--y", action="append", metavar="NAME",
                    help="data set on a panel's y axis (repeatable; default: every one but --x, a panel each)")
    pl.add_argument("--title", help="the figure's title (default: how many models)")

    le = sub.add_parser(
        "learned", help="learned soup: mixing coefficients trained on held-out data (O(P) memory)",
        description="Learns one coefficient per checkpoint (--layerwise: per checkpoint and tensor) on the held-out "
                    "batches by gradient descent, streaming the checkpoints (memory does not grow with their number). "
                    "Defaults follow the official learned_soup.py (softmax, AdamW lr 0.05), for at least 5 epochs "
                    "and 500 steps (whole epochs). Prints the steps run and the time per step; warns in one line "
                    "when the soup's held-out loss is no better than the uniform soup's.")
    le.add_argument("inputs", nargs="+", metavar="CKPT", help="checkpoints fine-tuned from one init")
    le.add_argument("--model", required=True, metavar="MOD:FACTORY",
                    help="a function returning the nn.Module (float32 parameters), e.g. mypkg.models:make_model "
                         "(or path/file.py:make_model)")
    le.add_argument("--heldout", required=True, metavar="MOD:LOADER",
                    help="a function returning the held-out (inputs, labels) batches the coefficients are trained on")
    le.add_argument("--eval", action="append", default=[], metavar="NAME=MOD:LOADER",
                    help="another data set to report the learned soup's accuracy on (repeatable)")
    le.add_argument("-o", "--out", required=True, metavar="OUT",
                    help="where to write the learned soup (safetensors) and its JSON sidecar")
    le.add_argument("--layerwise", action="store_true", help="one coefficient per checkpoint and tensor")
    le_len = le.add_mutually_exclusive_group()
    le_len.add_argument("--epochs", type=int, metavar="N",
                        help="exactly N passes over the held-out batches (default: whole epochs, at least 5 and at "
                             "least 500 steps)")
    le_len.add_argument("--steps", type=int, metavar="N", help="exactly N steps (instead of --epochs)")
    le.add_argument("--lr", type=float, default=0.05, help="AdamW learning rate (default: 0.05)")
    le.add_argument("--parametrization", choices=["softmax", "free"], default="softmax",
                    help="softmax: weights >= 0 summing to 1 (default); free: any real weights")
    le.add_argument("--cache", metavar="DIR", help="keep the result: a rerun returns it without training")
    le.add_argument("--verify-cache", action="store_true",
                    help="key the cache by every byte of the checkpoints, not by file identity and sampled content")
    le.add_argument("--device", help="evaluation device (the eval_device of learned_soup; default: the model's)")
    le.add_argument("--key", metavar="KEY", help=KEY_HELP)
    le.add_argument("--no-progress", action="store_true", help="no progress bar")
    le.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    le.add_argument("--config-from", metavar="PATH", help=_CONFIG_FROM_HELP)
    _name_options(le)

    ins = sub.add_parser("inspect", help="what a checkpoint holds: tensors, parameters, dtypes, shards, metadata",
                         description="Counts of tensors, parameters and bytes per dtype, the files of a sharded "
                                     "checkpoint, its metadata, and for a training checkpoint its entries and the one "
                                     "the state dict was taken from.")
    ins.add_argument("path", metavar="PATH", help="a checkpoint file, sharded folder or index file")
    ins.add_argument("--tensors", action="store_true", help="also list every tensor: name, shape and dtype")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.add_argument("--key", metavar="KEY", help=KEY_HELP)

    si = sub.add_parser("similarity", help="pairwise cosine similarity / angle of checkpoints or task vectors",
                        description="One streaming pass over the checkpoints. With --base (the pretrained init), "
                                    "compares the task vectors theta_k - base, as the paper's angle analysis does.")
    si.add_argument("inputs", nargs="+", metavar="CKPT", help="the checkpoints to compare")
    si.add_argument("--base", metavar="B", help="subtract this checkpoint first (task vectors)")
    si.add_argument("--angles", action="store_true", help="print angles in degrees instead of cosines")
    si.add_argument("--plot", metavar="PNG", help="also write a heatmap")
    si.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: all)")
    si.add_argument("--key", metavar="KEY", help=KEY_HELP)

    _analyze_parser(sub, a._negative_number_matcher if hasattr(a, "_negative_number_matcher") else None)

    d = sub.add_parser("demo", help=f"the paper's experiment in miniature (real digits data, {DEMO_SECONDS} on 2 cores)",
                       description="Pretrains a small MLP on scikit-learn's bundled digits, fine-tunes N models with a random "
                                   "hyperparameter search, and compares every model, the uniform and greedy soups and the "
                                   "logit ensembles on held-out, test and shifted test data; writes a table, results.jsonl, "
                                   "the greedy soup and a figure. Nothing is downloaded. "
                                   f"Takes {DEMO_SECONDS} on 2 cores.")
    d.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default: demo_out)")
    d.add_argument("--models", type=int, default=12, metavar="N", help="fine-tunes (default: 12)")
    d.add_argument("--seed", type=int, default=0, help="seed of the data split and the search (default: 0)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")

    sub.add_parser("info", help="what the native core uses on this machine")
    return p


def _analyze_parser(sub, negative) -> None:
    """``fastsoup analyze {landscape,interpolate,pairs,ensemble-vs-soup,count}``."""
    an = sub.add_parser("analyze", help="the paper's analyses: loss landscape, interpolation, angle vs gain, "
                                        "soup vs ensemble, soup size (JSONL + PNG)",
                        description="Evaluates many soups of the checkpoints on the held-out set, prepared once, each "
                                    "soup written into the model in place; writes one JSON row per point to OUT and "
                                    "a figure beside it (OUT with .png; needs matplotlib).")
    kinds = an.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS",
                              help="landscape, interpolate, pairs, ensemble-vs-soup or count")
    specs = [
        ("landscape", "accuracy and loss on the plane through A, B, C (paper Fig. 2)",
         "The point (x, y) is A + x (B - A) + y (C - A), on a STEPS x STEPS grid over LO .. HI on both axes "
         "(default -0.5 .. 1.5 in 21 steps: A, B, C are grid points). For the paper's plane, A is the zero-shot or "
         "pretrained model.", ["A", "B", "C"]),
        ("interpolate", "accuracy along (1 - alpha) A + alpha B (B zero-shot: the WiSE-FT curve)",
         "Scores (1 - alpha) A + alpha B at STEPS alphas from 0 to 1 (or --alphas); with B the zero-shot or base "
         "model this is the WiSE-FT curve.", ["A", "B"]),
        ("pairs", "angle between task vectors against the 2-soup's gain, every pair (paper Fig. 3)",
         "For every pair of fine-tunes: the angle between their task vectors (theta - BASE) and the held-out "
         "accuracy of their 2-soup minus the mean of the two; the last row has the correlation coefficient.", None),
        ("ensemble-vs-soup", "the 2-soup against the 2-ensemble, every pair (paper Fig. 4)",
         "For every pair of fine-tunes: the 2-soup's held-out accuracy and the 2-ensemble's (the mean of the two "
         "models' logits, from the cached logits: no evaluation), and their gains over the mean of the two.", None),
        ("count", "greedy and uniform soup accuracy against the number of ingredients",
         "The fine-tunes in held-out order (best first): the uniform soup of the first n and the greedy soup of the "
         "first n (one greedy run), for n = 1 .. N.", None),
    ]
    for name, help_, description, positional in specs:
        p = kinds.add_parser(name, help=help_, description=description)
        if negative is not None:  # --span -0.5 1.5, --alphas -0.2: numbers, not options
            p._negative_number_matcher = negative
        if positional is None:
            p.add_argument("inputs", nargs="+", metavar="CKPT", help="the fine-tuned checkpoints")
        else:
            for arg in positional:
                p.add_argument(arg.lower(), metavar=arg, help=f"checkpoint {arg}")
        p.add_argument("--model", required=True, metavar="MOD:FACTORY",
                       help="a function returning the nn.Module, e.g. mypkg.models:make_model (or path/file.py:make_model)")
        p.add_argument("--heldout", metavar="MOD:LOADER",
                       help="a function returning the held-out (inputs, labels) batches; without it, the held-out set "
                            "stored in --cache by an earlier run")
        p.add_argument("--eval", action="append", default=[], metavar="NAME=MOD:LOADER",
                       help="another data set to score at every point (repeatable)")
        p.add_argument("-o", "--out", required=True, metavar="OUT.jsonl", help="where to write the rows (JSONL)")
        p.add_argument("--png", metavar="PNG", help="where to write the figure (default: OUT with .png)")
        p.add_argument("--no-plot", action="store_true", help="no figure")
        if name == "landscape":
            p.add_argument("--steps", type=int, default=21, metavar="N", help="grid points per axis (default: 21)")
            p.add_argument("--span", nargs=2, type=float, default=[-0.5, 1.5], metavar=("LO", "HI"),
                           help="the range of x and y (default: -0.5 1.5)")
        if name == "interpolate":
            p.add_argument("--steps", type=int, default=21, metavar="N", help="alphas from 0 to 1 (default: 21)")
            p.add_argument("--alphas", nargs="+", type=float, metavar="ALPHA", help="the alphas (instead of --steps)")
        if name == "pairs":
            p.add_argument("--base", required=True, metavar="BASE",
                           help="the pretrained init the fine-tunes start from (task vectors are theta - BASE)")
        if name == "count":
            p.add_argument("--strict", action="store_true", help="the greedy soup keeps a candidate only if it improves")
        p.add_argument("--cache", metavar="DIR", help="logit cache (shared with fastsoup greedy): a rerun evaluates nothing")
        p.add_argument("--verify-cache", action="store_true",
                       help="key the cache by every byte of the checkpoints, not by file identity and sampled content")
        p.add_argument("--device", help="evaluation device (default: the model's)")
        p.add_argument("--key", metavar="KEY", help=KEY_HELP)
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--overwrite", action="store_true", help="replace OUT and the figure if they exist")
        _name_options(p)


def _output_options(p: argparse.ArgumentParser, layout: str) -> None:
    """The options of a merge's output and inputs, shared by ``average`` and ``merge``; ``layout``: whose
    dtype and shards the output takes by default."""
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help=f"output dtype (default: {layout})")
    p.add_argument("--shard-size", metavar="SIZE", help=f"largest output shard, e.g. 5GB (default: {layout})")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--fsync", action="store_true", help="flush OUT to disk before it appears (durable, slower)")
    p.add_argument("--key", metavar="KEY", help=KEY_HELP)
    p.add_argument("--config-from", metavar="PATH", help=_CONFIG_FROM_HELP)
    _name_options(p)


def _name_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strip-prefix", metavar="PREFIX",
                   help="remove PREFIX from the checkpoints' tensor names, e.g. 'module.' (DDP, open_clip training)")
    p.add_argument("--rename", action="append", default=[], metavar="REGEX=REPLACEMENT",
                   help="rename the checkpoints' tensors (re.sub, repeatable, applied in order) to the model's names")


def _key_map(args):
    rules = []
    for spec in args.rename:
        pattern, sep, repl = spec.partition("=")
        if not sep or not pattern:
            raise ArgumentError(f"--rename {spec!r}: expected REGEX=REPLACEMENT")
        rules.append((pattern, repl))
    return rules or None


def _greedy(args) -> int:
    from .io.checkpoint import with_key
    from .report import greedy_report

    evals = _evals(args.eval)
    report = greedy_report(
        with_key(args.inputs, args.key), model=args.model, heldout=args.heldout, evals=evals, out=args.out,
        cache_dir=args.cache, strict=args.strict, eval_device=args.device, results=args.results,
        progress=False if args.no_progress else None, overwrite=args.overwrite,
        verify="full" if args.verify_cache else "sample", config_from=args.config_from, key_map=_key_map(args),
        strip_prefix=args.strip_prefix,
    )
    print(report.table())
    _note(f"wrote {report.out} and {report.results_path} in {report.seconds:.2f} s")
    return 0


def _learned(args) -> int:
    import os

    from .recipes.learned import LearnedSoupWarning, learned_soup
    from .report import load_callable

    evals = _evals(args.eval)
    if os.path.exists(args.out) and not args.overwrite:
        raise OutputExistsError(f"{args.out} exists: pass --overwrite to replace it")
    start = time.perf_counter()
    model = load_callable(args.model, "model factory")()
    with warnings.catch_warnings():  # said below in one line, after the numbers it is about
        warnings.simplefilter("ignore", LearnedSoupWarning)
        r = learned_soup(args.inputs, model, load_callable(args.heldout, "held-out loader")(),
                         layerwise=args.layerwise, epochs=args.epochs, steps=args.steps, lr=args.lr,
                         parametrization=args.parametrization, cache_dir=args.cache, eval_device=args.device,
                         progress=False if args.no_progress else None, verify="full" if args.verify_cache else "sample",
                         key=args.key, key_map=_key_map(args), strip_prefix=args.strip_prefix)
    coeff = r.coefficients if not r.layerwise else r.coefficients.mean(0)
    print(f"{'checkpoint':<40}  {'coefficient' if not r.layerwise else 'mean coefficient':>16}")
    for name, c in zip(args.inputs, coeff.tolist()):
        print(f"{name:<40}  {c:>16.4f}")
    print(f"held-out accuracy {100 * r.score:.2f}, loss {r.loss:.4f} (uniform soup: accuracy {100 * r.uniform_score:.2f}, "
          f"loss {r.uniform_loss:.4f}), beta {r.beta:.3f}")
    print(f"{r.steps} step{'' if r.steps == 1 else 's'} in {r.seconds:.2f} s ({1000 * r.seconds_per_step:.2f} ms per step, "
          "median)" + (" (cached)" if r.cached else ""))
    if r.advice is not None:
        _note(f"fastsoup: warning: {r.advice}")
    if evals:
        from .search import evaluate, prepare

        r.load_into(model)
        for name, spec in evals.items():
            data = prepare(load_callable(spec, f"eval loader {name!r}")(), next(model.parameters()).device, name=name)
            print(f"{name} accuracy {100 * evaluate(model, data).score:.2f}")
    path = r.save(args.out, overwrite=args.overwrite, config_from=args.config_from)
    _note(f"wrote {path} in {time.perf_counter() - start:.2f} s")
    return 0


def _analyze(args) -> int:
    import os

    from .analysis import Analyzer
    from .analysis.core import check_output
    from ._plotting import HINT as INSTALL
    from .analysis.plots import available
    from .report import load_callable

    evals = _evals(args.eval)
    png = None if args.no_plot else (args.png or os.path.splitext(args.out)[0] + ".png")
    for path in [args.out] + ([png] if png else []):  # before any work
        check_output(path, args.overwrite)
    if args.heldout is None and args.cache is None:
        raise ArgumentError("give --heldout MOD:LOADER, or --cache DIR of an earlier run (which stored the held-out set)")
    kind = args.analysis
    inputs = [args.a, args.b, args.c] if kind == "landscape" else [args.a, args.b] if kind == "interpolate" else args.inputs
    start = time.perf_counter()
    model = load_callable(args.model, "model factory")()
    heldout = load_callable(args.heldout, "held-out loader")() if args.heldout is not None else None
    an = Analyzer(inputs, model, heldout, base=getattr(args, "base", None),
                  evals={n: load_callable(spec, f"eval loader {n!r}")() for n, spec in evals.items()},
                  cache_dir=args.cache, eval_device=args.device, progress=False if args.no_progress else None,
                  verify="full" if args.verify_cache else "sample", key=args.key, key_map=_key_map(args),
                  strip_prefix=args.strip_prefix)
    if kind == "landscape":
        r = an.landscape(0, 1, 2, steps=args.steps, span=tuple(args.span))
    elif kind == "interpolate":
        r = an.interpolate(0, 1, alphas=args.alphas, steps=args.steps)
    elif kind == "pairs":
        r = an.pairs()
    elif kind == "ensemble-vs-soup":
        r = an.ensemble_vs_soup()
    else:
        r = an.count(strict=args.strict)
    print(_analysis_summary(r))
    written = [r.write_jsonl(args.out, overwrite=args.overwrite)]
    if png is not None:
        if available():
            written.append(r.plot(png, overwrite=args.overwrite))
        else:
            _note(f"fastsoup: note: no figure: it needs matplotlib: {INSTALL}")
    _note(f"wrote {' and '.join(written)} in {time.perf_counter() - start:.2f} s")
    return 0


def _analysis_summary(r) -> str:
    """A few lines on an analysis: its points, the best of them, its correlation, its time per soup."""
    st = r.stats
    per = f", {1000 * st['seconds_per_soup']:.2f} ms per evaluated soup" if st["seconds_per_soup"] else ""
    lines = [f"{r.analysis}: {st['points']} points ({st['evaluated']} soups evaluated, "
             f"{st['points'] - st['evaluated']} from the cache or free) in {st['seconds']:.2f} s{per}"]
    pts = r.points
    if r.analysis in ("landscape", "interpolate"):
        best = max(pts, key=lambda p: p["accuracy"])
        where = f"x = {best['x']:g}, y = {best['y']:g}" if r.analysis == "landscape" else f"alpha = {best['alpha']:g}"
        lines.append(f"best held-out accuracy {100 * best['accuracy']:.2f} at {where} (weights {best['weights']})")
    elif r.analysis == "count":
        for kind in ("uniform", "greedy"):
            last = [p for p in pts if p["kind"] == kind][-1]
            lines.append(f"{kind} soup of all {last['n']}: held-out accuracy {100 * last['accuracy']:.2f} "
                         f"({len(last['members'])} ingredients)")
    else:
        rr = r.summary["pearson_r"]
        what = "angle and gain" if r.analysis == "pairs" else "ensemble gain and soup gain"
        lines.append(f"{len(pts)} pairs; correlation of {what}: " + ("n/a" if rr is None else f"r = {rr:.3f}"))
        if r.analysis == "ensemble_vs_soup":
            lines.append(f"the soup is at least as accurate as the ensemble for {r.summary['soup_at_least_ensemble']} "
                         f"of {len(pts)} pairs")
    return "\n".join(lines)


def _inspect(args) -> int:
    from .diagnostics import inspect_checkpoint

    info = inspect_checkpoint(args.path, key=args.key, tensors=args.tensors)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['source']}: {info['tensors']} tensors, {info['params']:,} parameters, {info['bytes'] / 1e6:.1f} MB")
    if info["entries"] is not None:
        print(f"  training checkpoint: the state dict is {info['key']!r}; entries:")
        width = max(len(k) for k in info["entries"])
        for name, what in info["entries"].items():
            print(f"    {name:<{width}}  {what}")
    for dt, d in info["dtypes"].items():
        print(f"  {dt:<10} {d['tensors']:>6} tensors {d['params']:>16,} parameters {d['bytes'] / 1e6:>10.1f} MB")
    if info["shards"]:
        print(f"  {len(info['shards'])} file(s):")
        for sh in info["shards"]:
            print(f"    {sh['file']}  {sh['bytes'] / 1e6:.1f} MB, {sh['tensors']} tensors")
    if info["metadata"]:
        print(f"  metadata: {json.dumps(info['metadata'])[:500]}")
    if args.tensors:
        rows = info["tensor_list"]
        shapes = [str(list(r["shape"])) for r in rows]
        nw = max((len(r["name"]) for r in rows), default=4)
        sw = max((len(x) for x in shapes), default=5)
        several = len(info["shards"]) > 1
        print(f"  {'name':<{nw}}  {'shape':<{sw}}  dtype" + ("      file" if several else ""))
        for r, shape in zip(rows, shapes):
            print(f"  {r['name']:<{nw}}  {shape:<{sw}}  {r['dtype']:<9}" + (f"  {r['file']}" if several else ""))
    return 0


def _similarity(args) -> int:
    from .diagnostics import similarity

    s = similarity(args.inputs, base=args.base, threads=args.threads, key=args.key)
    what = "angles" if args.angles else "cosine"
    label = "task vectors (minus " + args.base + ")" if args.base else "checkpoints"
    print(f"{'angles (degrees)' if args.angles else 'cosine similarity'} of {label}:")
    print(s.table(what))
    if args.plot:
        s.plot(args.plot, what)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _evals(specs) -> dict:
    evals = {}
    for spec in specs:
        name, sep, target = spec.partition("=")
        if not sep or not name or not target:
            raise ArgumentError(f"--eval {spec!r}: expected NAME=MOD:LOADER")
        if name in evals or name == "heldout":
            raise ArgumentError(f"--eval {spec!r}: the name {name!r} is already used")
        evals[name] = target
    return evals


def _plot(args) -> int:
    from .report import plot_results

    path = plot_results(args.results, args.out, x=args.x, y=args.y, title=args.title)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _average(args) -> int:
    from .engine import average

    start = time.perf_counter()
    path = average(
        args.inputs,
        args.weights,
        out=args.out,
        dtype=args.dtype,
        threads=args.threads,
        shard_size=args.shard_size,
        progress=False if args.no_progress else None,
        overwrite=args.overwrite,
        fsync=args.fsync,
        config_from=args.config_from,
        key_map=_key_map(args),
        strip_prefix=args.strip_prefix,
        key=args.key,
    )
    _note(f"wrote {path} from {len(args.inputs)} checkpoints in {time.perf_counter() - start:.2f} s")
    return 0


def _merge(args) -> int:
    from .engine import merge, merge_config

    start = time.perf_counter()
    options = dict(out=args.out, dtype=args.dtype, threads=args.threads, shard_size=args.shard_size,
                   progress=False if args.no_progress else None, overwrite=args.overwrite, fsync=args.fsync,
                   config_from=args.config_from, key_map=_key_map(args), strip_prefix=args.strip_prefix, key=args.key)
    method_args = {"--method": args.method, "--base": args.base, "--weights": args.weights, "--lambda": args.lam,
                   "--t": args.t, "--normalize": args.normalize, "--density": args.density, "--gamma": args.gamma,
                   "--rescale": args.rescale}
    if len(args.inputs) == 1 and args.inputs[0].endswith((".yml", ".yaml")):
        given = [k for k, v in method_args.items() if v is not None]
        if given:
            raise ArgumentError(f"merge: the config gives the method and its parameters; drop {', '.join(given)}")
        path = merge_config(args.inputs[0], seed=args.seed, **options)
        what = f"config {args.inputs[0]}"
    else:
        if args.method is None:
            raise ArgumentError("merge: give --method METHOD (task_arithmetic, ties, dare_ties, dare_linear, "
                                "breadcrumbs, breadcrumbs_ties, slerp, model_stock, linear) or one CONFIG.yml")
        rescale = "default" if args.rescale is None else None if args.rescale == "none" else args.rescale
        path = merge(args.inputs, args.method, base=args.base, weights=args.weights, lam=args.lam, t=args.t,
                     normalize=args.normalize, density=args.density, gamma=args.gamma, seed=args.seed,
                     rescale=rescale, **options)
        what = f"{len(args.inputs)} checkpoints ({args.method})"
    _note(f"wrote {path} from {what} in {time.perf_counter() - start:.2f} s")
    return 0


def _note(msg: str) -> None:
    """A status line on stderr (under torchrun: from rank 0 only)."""
    from .distributed import is_main_process

    if is_main_process():
        print(msg, file=sys.stderr)


@contextlib.contextmanager
def _notes():
    """fastsoup's notes as one line each on stderr, once each: :class:`~fastsoup.io._sidefiles.SoupNote`
    (mixed dtypes, LoRA factors) and :class:`~fastsoup.StateDictChoiceWarning` (once per kind of
    choice: K inputs of one training script give one line, not K); other warnings as Python shows them."""
    from ._errors import StateDictChoiceWarning
    from .io._sidefiles import SoupNote

    seen = set()
    with warnings.catch_warnings():  # restores showwarning and the filters on leaving
        warnings.simplefilter("always", SoupNote)
        warnings.simplefilter("always", StateDictChoiceWarning)
        show = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if isinstance(message, StateDictChoiceWarning):
                key = (message.taken, message.others)
                others = ", ".join(map(repr, message.others))
                text = (f"{message.source} holds several state dicts: took {message.taken!r} (here and from every "
                        f"input like it), not {others}; --key {message.others[0]} takes "
                        f"{'that one' if len(message.others) == 1 else 'another'}")
            elif isinstance(message, SoupNote):
                key = text = str(message)
            else:
                return show(message, category, filename, lineno, file, line)
            if key not in seen:
                seen.add(key)
                _note(f"fastsoup: note: {text}")
            return None

        warnings.showwarning = showwarning
        yield


def _check_device(device) -> None:
    """``--device``: one torch knows and this process can use, said in one line instead of torch's
    traceback (a CPU-only torch asked for CUDA raises an AssertionError deep in the first copy)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ArgumentError(f"--device {device}: not a device torch knows (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ArgumentError(
                f"--device {device}: this torch ({torch.__version__}) is built without CUDA; install a CUDA build of "
                "torch, or leave out --device to run on the CPU"
            )
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ArgumentError(f"--device {device}: no CUDA device is visible to this process")
        if dev.index is not None and dev.index >= count:
            raise ArgumentError(f"--device {device}: {count} CUDA device(s) visible (cuda:0 to cuda:{count - 1})")
    elif dev.type not in ("cpu", "meta"):
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if callable(available) and not available():
            raise ArgumentError(
                f"--device {device}: no {dev.type} device is available to this torch ({torch.__version__})")


def _error(e: Exception, command: str) -> int:
    """Reports an exception out of a command; returns the exit code (1).

    fastsoup's own errors (a :class:`~fastsoup.FastsoupError`; an OSError raised outside the user's
    code) are one line, multi-line messages joined. Anything else is a bug where it was raised: one
    line naming the user's function it came from (the first frame of the user's code in the
    traceback: the ``--model`` factory, a loader, the model's forward, a dataset's ``__getitem__``),
    or saying it came from fastsoup, then the full traceback."""
    frame = _user_frame(e.__traceback__)
    msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if isinstance(e, FastsoupError) or (isinstance(e, OSError) and frame is None):
        print(f"fastsoup: error: {msg or type(e).__name__}", file=sys.stderr)
        return 1
    what = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    if frame is None:
        head = (f"fastsoup: error: {what} (raised inside fastsoup {command}, not one of fastsoup's errors: a bug; "
                "please report it with the traceback below)")
    else:
        head = f"fastsoup: error in your {_describe_user_frame(frame)} (called by fastsoup {command}): {what}"
    print(head, file=sys.stderr)
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    return 1


def _library_roots() -> tuple[str, ...]:
    """Folders whose code is not the user's: fastsoup, the standard library, and the libraries that
    call the user's code on fastsoup's behalf (torch's module call and DataLoader) or that fastsoup uses."""
    import os
    import sysconfig

    roots = [os.path.dirname(os.path.abspath(__file__))]
    roots += [sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib") if k in sysconfig.get_paths()]
    for name in ("torch", "numpy", "tqdm", "matplotlib"):
        mod = sys.modules.get(name)
        if getattr(mod, "__file__", None):
            roots.append(os.path.dirname(os.path.abspath(mod.__file__)))
    return tuple(os.path.join(r, "") for r in roots)


def _user_frame(tb):
    """Where the traceback enters the user's code: the outermost frame outside fastsoup, the standard
    library and torch (the user's function that fastsoup, or torch for fastsoup, called), or a call of
    an ``nn.Module`` (the model's forward, even of torch's own layers), whichever comes first; None if
    the exception never left fastsoup and the libraries."""
    import os

    roots = _library_roots()
    torch = sys.modules.get("torch")
    while tb is not None:
        frame = tb.tb_frame
        filename = frame.f_code.co_filename
        if not filename.startswith("<") and not os.path.abspath(filename).startswith(roots):
            return frame
        if (torch is not None and frame.f_code.co_name in ("_call_impl", "_wrapped_call_impl")
                and isinstance(frame.f_locals.get("self"), torch.nn.Module)):
            return frame
        tb = tb.tb_next
    return None


def _describe_user_frame(frame) -> str:
    """``model factory mypkg.models:make_net`` (a function load_callable loaded: as it was given),
    ``model's mypkg.models:Net.forward`` (an nn.Module's method, or the call of one), else
    ``code mypkg.data:load``."""
    from .report import loaded_as

    code = frame.f_code
    loaded = loaded_as(code)
    if loaded is not None:
        return f"{loaded[0]} {loaded[1]}"
    self = frame.f_locals.get("self")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(self, torch.nn.Module):
        if code.co_name in ("_call_impl", "_wrapped_call_impl"):  # torch calling the model: name its forward
            forward = getattr(type(self).forward, "__code__", code)
            return f"model's {_where(type(self).__module__, forward)}"
        return f"model's {_where(frame.f_globals.get('__name__', '?'), code)}"
    return f"code {_where(frame.f_globals.get('__name__', '?'), code)}"


def _where(module: str, code) -> str:
    """``module:qualname``; a module loaded from a file (``path/file.py:func``) or run as a script: the file."""
    import os

    if module.startswith("_fastsoup_user_") or module == "__main__":
        path = os.path.relpath(code.co_filename)
        module = path if not path.startswith("..") else code.co_filename
    return f"{module}:{getattr(code, 'co_qualname', code.co_name)}"


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Python sees it, so the run cleans up as it does for Ctrl-C
    (temporary files removed, nothing left at OUT)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum, _frame):
    raise Terminated(signum)


def _interrupted(e: KeyboardInterrupt) -> int:
    from ._errors import InterruptedAfterInstall

    cause = e.__cause__ if isinstance(e, InterruptedAfterInstall) else e
    signum = cause.signum if isinstance(cause, Terminated) else signal.SIGINT
    if isinstance(e, InterruptedAfterInstall):
        print(f"fastsoup: {e}", file=sys.stderr)
    elif isinstance(e, Terminated):
        print(f"fastsoup: terminated ({signal.Signals(signum).name})", file=sys.stderr)
    else:
        print("fastsoup: interrupted", file=sys.stderr)
    return 128 + int(signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            handlers[sig] = signal.signal(sig, _terminate)
    try:
        return _main(args)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM or SIGHUP outside the command's own handling
        return _interrupted(e)
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)


def _main(args) -> int:
    with _notes():  # fastsoup's notes: one line each
        try:
            from . import native_info
            from .distributed.launch import cli_begin

            if args.command in ("greedy", "learned", "analyze"):
                _check_device(args.device)
            cli_begin(args)  # launched by torchrun: join the process group (average, greedy, learned)
            if args.command == "info":
                print(json.dumps(native_info(), indent=2))
                return 0
            if args.command == "greedy":
                return _greedy(args)
            if args.command == "plot":
                return _plot(args)
            if args.command == "learned":
                return _learned(args)
            if args.command == "inspect":
                return _inspect(args)
            if args.command == "similarity":
                return _similarity(args)
            if args.command == "analyze":
                return _analyze(args)
            if args.command == "merge":
                return _merge(args)
            if args.command == "demo":
                from .demo import main as demo_main

                return demo_main(args.out, args.models, args.seed, False if args.no_progress else None)
            return _average(args)
        except KeyboardInterrupt as e:
            return _interrupted(e)
        except Exception as e:  # noqa: BLE001 -- every exception becomes exit code 1, each said as it deserves
            return _error(e, args.command)
        finally:
            from .distributed.launch import cli_end

            cli_end()


if __name__ == "__main__":
    raise SystemExit(main())
