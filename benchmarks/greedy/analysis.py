"""The greedy benchmark's checks and analysis, after timing (bench_greedy.py): the decisions of
every run against the baseline's, the final soups' parameters, the checkpoint bytes fastsoup's
fingerprints read, the replay of every candidate that counts how many batches an exact early
rejection needs in each held-out order, and the cost model of both searches.
"""

from __future__ import annotations

import math

import torch

import fastsoup

from .model import make_model

# fastsoup.search.fingerprint_checkpoint (verify="sample", its docstring): tensors up to 64 KiB are
# read whole, larger ones as 8 samples of 512 bytes.
FINGERPRINT_WHOLE_BYTES = 64 << 10
FINGERPRINT_SAMPLES, FINGERPRINT_SAMPLE_BYTES = 8, 512


def fingerprint_bytes(path: str) -> int:
    """Checkpoint bytes fastsoup's cache fingerprint reads (outside its bytes_read counters)."""
    n = 0
    for ref in fastsoup.open_checkpoint(path).values():
        n += ref.nbytes if ref.nbytes <= FINGERPRINT_WHOLE_BYTES else FINGERPRINT_SAMPLES * FINGERPRINT_SAMPLE_BYTES
    return n


def decisions(r) -> dict:
    if "result" in r:
        res = r["result"]
        return {"indices": list(res.indices), "score": res.score, "order": list(res.order),
                "individual_scores": list(res.individual_scores),
                "accepted": [h["accepted"] for h in res.history]}
    return {"indices": r["indices"], "score": r["score"], "order": r["order"],
            "individual_scores": r["individual_scores"], "accepted": [h["accepted"] for h in r["history"]]}


def max_param_diff(a: dict, b: dict) -> tuple[float, float, float]:
    """(max |a - b|, max |a|, fraction of elements that differ) over all tensors."""
    worst = scale = 0.0
    differ = total = 0
    for k in a:
        x, y = a[k].float(), b[k].float()
        worst = max(worst, float((x - y).abs().max()))
        scale = max(scale, float(x.abs().max()))
        differ += int((x != y).sum())
        total += x.numel()
    return worst, scale, differ / total


def hardest_first_analysis(cfg, sts, base, xte, yte):
    """Replays the baseline's search and counts, over all candidates, the batches an exact early
    rejection runs when the held-out set is taken
    - ``loader_order``: batch by batch in the loader's order;
    - ``batch_hardest_first``: whole batches, those where the current soup errs most first (ties in
      loader order), as fastsoup's ``reorder="batches"``;
    - ``example_hardest_first``: examples sorted by the current soup's margin (true-class logit minus
      the best other one, smallest first), re-batched in batches of the same size for every candidate,
      as fastsoup's default ``reorder="examples"`` (so it should equal the batches fastsoup ran);
    - ``rebatched_once``: examples re-batched once, sorted by the first soup's (the best ingredient's)
      margin, then whole batches hardest-first by the current soup as above (one fixed set of batches
      for the whole search, so a cache of logits stays valid)."""
    model = make_model(cfg).eval()
    sds = [fastsoup.open_checkpoint(p) for p in sts]
    sd = [{k: ck.tensor(k) for k in ck} for ck in sds]
    bs = cfg.batch_size
    nb = math.ceil(xte.shape[0] / bs)
    total = xte.shape[0]

    def logits_of(state):
        model.load_state_dict(state)
        with torch.no_grad():
            return torch.cat([model(xte[i:i + bs]) for i in range(0, total, bs)])

    def batches_needed(right: torch.Tensor, need: int, batch_order=None) -> int:
        """right: per example, in the order of the batches' layout; batch_order: which batch runs when."""
        seen = correct = 0
        for k, b in enumerate(batch_order if batch_order is not None else range(nb)):
            chunk = right[b * bs:(b + 1) * bs]
            seen += chunk.numel()
            correct += int(chunk.sum())
            if seen < total and correct + (total - seen) < need:
                return k + 1
        return nb

    def errors_first(wrong: torch.Tensor) -> list[int]:
        errs = [int(wrong[b * bs:(b + 1) * bs].sum()) for b in range(nb)]
        return sorted(range(nb), key=lambda b: -errs[b])

    def margin(logits):
        true = logits.gather(1, yte[:, None])[:, 0]
        other = logits.scatter(1, yte[:, None], float("-inf")).max(1).values
        return true - other

    def avg(members):
        return {k: sum(sd[i][k] for i in members) / len(members) for k in sd[0]}

    hist = base["history"]
    kept = [hist[0]["index"]]
    best = hist[0]["correct"]
    soup_logits = logits_of(sd[kept[0]])
    fixed = torch.argsort(margin(soup_logits), stable=True)  # the once-only re-batching
    counts = {"loader_order": 0, "batch_hardest_first": 0, "example_hardest_first": 0, "rebatched_once": 0}
    full = 0
    for h in hist[1:]:
        j = h["index"]
        cand_logits = logits_of(avg(kept + [j]))
        right = cand_logits.argmax(1) == yte
        soup_wrong = soup_logits.argmax(1) != yte
        need = best + 1
        counts["loader_order"] += batches_needed(right, need)
        counts["batch_hardest_first"] += batches_needed(right, need, errors_first(soup_wrong))
        counts["example_hardest_first"] += batches_needed(right[torch.argsort(margin(soup_logits), stable=True)], need)
        counts["rebatched_once"] += batches_needed(right[fixed], need, errors_first(soup_wrong[fixed]))
        full += nb
        if int(right.sum()) > best:
            kept.append(j)
            best = int(right.sum())
            soup_logits = cand_logits
    return {"candidate_batches": full, **counts}


def check_decisions(raw: dict, cfg, setup_correct, log) -> dict:
    """Every run's decisions (kept ingredients and their order, score, accepted steps) against the
    baseline's first run, the candidates' margins, and the final soups' parameters."""
    ref = decisions(raw["baseline"][0])
    same = True
    for name, runs in raw.items():
        for i, run in enumerate(runs):
            d = decisions(run)
            for key in ("indices", "score", "order", "accepted"):
                if d[key] != ref[key]:
                    same = False
                    log(f"DECISIONS DIFFER: {name} round {i + 1}: {key} {d[key]} vs baseline {ref[key]}")
            if d["individual_scores"] != ref["individual_scores"]:
                log(f"note: {name} round {i + 1}: individual scores differ: {d['individual_scores']} vs "
                    f"{ref['individual_scores']}")
    base0 = raw["baseline"][0]
    hist = base0["history"]
    margins = []
    best = hist[0]["correct"]
    for h in hist[1:]:
        margins.append(h["correct"] - best)
        if h["accepted"]:
            best = h["correct"]
    n_acc = sum(h["accepted"] for h in hist[1:])
    soup_fast = raw["fastsoup_first"][0]["result"].state_dict()
    diff, scale, frac = max_param_diff(base0["soup"], soup_fast)
    setup_match = [round(c / cfg.heldout, 12) for c in setup_correct] == [round(s, 12) for s in ref["individual_scores"]]
    return {
        "same": same, "kept": ref["indices"], "score": ref["score"], "correct": base0["correct"],
        "order": ref["order"], "accepted_of_candidates": n_acc, "rejected": len(hist) - 1 - n_acc,
        "margins_vs_best": margins, "closest_margin": min(abs(m) for m in margins),
        "soup_max_abs_diff": diff, "soup_max_abs": scale, "soup_fraction_differing": frac, "setup_scores_match": setup_match,
    }


def cost_model(cfg, summary: dict, analysis: dict | None) -> dict:
    """P, M = one pipeline pass and one model pass (the baseline's per-pass medians); f = fraction
    of candidate batches run. baseline ~ (2N-1)(P+M); fastsoup ~ P + N M + f (N-1) M."""
    n = cfg.n
    nb = math.ceil(cfg.heldout / cfg.batch_size)
    bb = summary["baseline"]
    P = bb["data_seconds"] / bb["evaluations"]
    M = bb["model_seconds"] / bb["evaluations"]
    fs = summary["fastsoup_first"]
    fracs = {"as run": fs["batches_evaluated"] / ((n - 1) * nb)}
    if analysis is not None:
        fracs["examples hardest-first"] = analysis["example_hardest_first"] / analysis["candidate_batches"]
        fracs["re-batched once"] = analysis["rebatched_once"] / analysis["candidate_batches"]
    model = {"P": P, "M": M, "predicted_baseline": (2 * n - 1) * (P + M)}
    for label, f in fracs.items():
        need = (3 * (n + f * (n - 1)) - (2 * n - 1)) / (2 * n - 1 - 3)
        model[label] = {"f": f, "predicted_fastsoup": P + n * M + f * (n - 1) * M,
                        "predicted_speedup": (2 * n - 1) * (P + M) / (P + n * M + f * (n - 1) * M),
                        "pipeline_over_model_for_3x": need}
    return model
