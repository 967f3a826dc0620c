"""fastsoup's greedy search alone, in a process of its own (for ``compare_builds.py --bench greedy``,
which starts it with another source tree's fastsoup on ``PYTHONPATH``).

    python -m benchmarks.greedy.child WORKDIR CONFIG_JSON PIPELINE [REORDER]

WORKDIR holds what compare_builds prepared with bench_greedy's code (greedy.data.make_data and
greedy.model.make_ingredients): the held-out set (``heldout.pt``, and the JPEG files for
``PIPELINE=jpeg``) and the ingredients (``checkpoints/model_I.safetensors``). The search is
bench_greedy's fastsoup contender, three runs in this order: ``first`` (a fresh ``cache_dir``),
``rerun`` (the same call again) and ``stored`` (``heldout=None``: the held-out set the first run
stored); REORDER is passed as ``reorder=`` (omitted: the build's default).

Prints one JSON line: ``{"runs": {first|rerun|stored: figures + "indices" + "score"}, "fastsoup":
the package's file, "isa"}``. Only fastsoup's public API.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile

import fastsoup
from torch.utils.data import DataLoader

from ..harness import native_info
from .contenders import preload, run_fastsoup
from .data import Config, load_heldout
from .model import ingredient_paths


def main(argv) -> int:
    workdir, config, pipeline, *rest = argv
    reorder = rest[0] if rest else None
    cfg = Config(**json.loads(config))
    preload()
    loader = DataLoader(load_heldout(cfg, pipeline, workdir), batch_size=cfg.batch_size, shuffle=False, num_workers=0)
    _, sts = ingredient_paths(cfg, f"{workdir}/checkpoints")
    cache_dir = tempfile.mkdtemp(prefix="cache-", dir=workdir)
    runs = {}
    try:
        for name, heldout in (("first", loader), ("rerun", loader), ("stored", None)):
            r = run_fastsoup(cfg, sts, heldout, cache_dir, reorder)
            res = r.pop("result")
            r.update(indices=list(res.indices), score=res.score)
            runs[name] = r
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    print(json.dumps({"runs": runs, "fastsoup": fastsoup.__file__, "isa": native_info(fastsoup).get("isa")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
