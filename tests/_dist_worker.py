"""One rank of the torch.distributed tests (tests/test_distributed.py), launched by
``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_dist_worker.py CONFIG.json``.

Runs every scenario of the config in one process group (gloo), one after another, and writes what each
rank saw (results, or the type and message of the exception it raised) to ``WORK/rank<r>.json``; the
test process compares them with the single-process results.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

import fastsoup
from fastsoup import engine
from fastsoup.distributed import DistributedError

import _tiny


def digest(sd: dict) -> dict:
    return {k: [str(v.dtype), list(v.shape), _sha(v)]
            for k, v in sd.items()}


def _sha(t) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def heldout():
    return _tiny.batches(*_tiny.make_data(_tiny.HELDOUT_SIZE, 3))


def model(cfg):
    from safetensors.torch import load_file

    m = _tiny.MLP()
    m.load_state_dict(load_file(cfg["init"]))
    return m


def accuracy_metric(logits, labels) -> float:
    return int((logits.argmax(dim=-1) == labels).sum()) / labels.shape[0]


def history(result) -> list:
    return [{k: h[k] for k in ("step", "index", "name", "score", "accepted", "batches", "of", "source")}
            for h in result.history]


def scenario(name, cfg, rank):
    paths, work = cfg["paths"], cfg["work"]
    out = os.path.join(work, name)
    if name == "merge_files":
        before = fastsoup._core.counters()["mapped_bytes_read"]
        fastsoup.average(paths, [1, 2, 3, 4, 5, 6, 7, 8], out=out, shard_size="1KB")
        return {"out": out, "read": fastsoup._core.counters()["mapped_bytes_read"] - before}
    if name == "merge_bf16":
        fastsoup.weighted_sum(paths[:3], [0.5, -1.25, 2.0], out=out, shard_size="1KB", dtype="bf16")
        return {"out": out}
    if name == "merge_memory":
        from safetensors.torch import load_file

        fastsoup.average([load_file(p) for p in paths[:4]], out=out, shard_size="600B")
        return {"out": out}
    if name == "merge_single":
        fastsoup.average(paths, out=out + ".safetensors")
        return {"out": out + ".safetensors"}
    if name == "merge_ties":  # a sparse method: the per-tensor kernel path, each rank its shards
        fastsoup.merge(paths[1:5], "ties", base=cfg["init"], density=0.4, out=out, shard_size="1KB")
        return {"out": out}
    if name == "merge_dare":
        fastsoup.merge(paths[1:4], "dare_ties", base=cfg["init"], density=0.5, seed=9, out=out, shard_size="1KB")
        return {"out": out}
    if name == "merge_none":
        return {"digest": digest(fastsoup.average(paths[:5]))}
    if name == "fail_ready":  # a damaged input that only rank 1 sees
        ins = paths[:3] + [cfg["corrupt"] if rank == 1 else paths[3]]
        fastsoup.average(ins, out=out, shard_size="1KB")
        return {}
    if name == "fail_work":  # rank 1 fails while writing its shards
        if rank == 1:
            original = engine.Segments.run

            def boom(self, *args, **kwargs):
                raise RuntimeError("injected failure on rank 1")

            engine.Segments.run = boom
        try:
            fastsoup.average(paths, out=out, shard_size="1KB")
        finally:
            if rank == 1:
                engine.Segments.run = original
        return {}
    if name == "exists":
        got = {}
        try:
            fastsoup.average(paths[:2], out=cfg["existing"], shard_size="1KB")
        except Exception as e:  # noqa: BLE001
            got["first"] = [type(e).__name__, str(e)]
        fastsoup.average(paths[:2], out=cfg["existing"], shard_size="1KB", overwrite=True)
        return got
    if name == "foreign":  # a folder with a file of the user's: refused even with overwrite
        try:
            fastsoup.average(paths[:2], out=cfg["foreign"], shard_size="1KB", overwrite=True)
        except Exception as e:  # noqa: BLE001
            return {"error": [type(e).__name__, str(e)]}
        return {"error": None}
    if name == "local":  # one rank alone, inside local(): no collective, no hang
        if rank == 0:
            with fastsoup.distributed.local():
                fastsoup.average(paths[:2], out=out)
        dist.barrier()
        return {"exists": os.path.isdir(out)}
    if name in ("greedy", "greedy_rerun"):
        r = fastsoup.greedy_soup(paths, model(cfg), heldout(), cache_dir=os.path.join(work, "cache"))
        res = {"indices": r.indices, "score": r.score, "history": history(r), "individual": r.individual_scores,
               "evaluations": r.stats.evaluations, "cached": r.stats.cached}
        if name == "greedy":
            r.save(os.path.join(work, "greedy_out"), shard_size="1KB")
        return res
    if name == "greedy_metric":
        r = fastsoup.greedy_soup(paths, model(cfg), heldout(), metric=accuracy_metric, strict=True)
        return {"indices": r.indices, "score": r.score, "history": history(r)}
    if name == "learned":
        r = fastsoup.learned_soup(paths[:4], model(cfg), heldout(), steps=6, seed=1)
        return {"coefficients": r.coefficients.tolist(), "beta": r.beta, "losses": r.losses, "score": r.score,
                "loss": r.loss}
    raise ValueError(name)


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for name in cfg["scenarios"]:
        try:
            results[name] = {"ok": True, **scenario(name, cfg, rank)}
        except Exception as e:  # noqa: BLE001 - the test checks which rank raised what
            results[name] = {"ok": False, "type": type(e).__name__, "message": str(e),
                             "distributed": isinstance(e, DistributedError),
                             "traceback": traceback.format_exc()}
    with open(os.path.join(cfg["work"], f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()  # no rank tears the group down while another still has gloo work in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
