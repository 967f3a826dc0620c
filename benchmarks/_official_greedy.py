"""A plain-torch reproduction of the greedy-soup loop of the official model-soups ``main.py``
(mlfoundations/model-soups, "Step 4: Greedy Soup", and ``utils.test_model_on_dataset``), on the CPU,
instrumented with timers. Used by ``bench_greedy.py`` as the baseline.

What is kept from the official code:
- every checkpoint is a ``.pt`` file read with ``torch.load(path, map_location="cpu")``;
- the ranking: accuracies in a dict, ``sorted(..., key=itemgetter(1))`` (ascending, stable), then
  ``.reverse()`` (so tied models come out in reverse input order);
- the soup starts as ``torch.load`` of the best ingredient (a second read of that file), with the
  best ingredient's accuracy as the threshold;
- each candidate: ``torch.load`` of the next ingredient, then
  ``{k: soup[k].clone() * (n / (n + 1.)) + new[k].clone() * (1. / (n + 1)) for k in new}`` (in the
  checkpoint dtype: float32 here), ``load_state_dict`` into the model, a full pass over the held-out
  DataLoader (the data pipeline runs again for every candidate), top-1 accuracy as ``correct / n``;
- acceptance with a strict ``>``.

What differs, and why:
- the official code reads the individual accuracies from ``individual_model_results.jsonl`` written by
  an earlier ``--eval-individual-models`` run; for an end-to-end comparison this baseline measures
  them here, each with a full pass through the same DataLoader (what that earlier run did, minus its
  other six data sets);
- ``get_model_from_sd`` builds a new ``ModelWrapper`` around the shared base model, moves it to the GPU
  and wraps it in ``DataParallel`` for every candidate; here one CPU model is reused and only
  ``load_state_dict`` runs per candidate (cheaper than the original, so the baseline is if anything
  flattered);
- no progress prints every 20 batches, no results file, no final evaluation on the other data sets.
"""

from __future__ import annotations

import operator
import os
import time

import torch


def test_model_on_dataset(model, loader, timer=None):
    """``utils.test_model_on_dataset`` on the CPU: top-1 accuracy over the whole loader.

    ``timer`` (a dict) gets ``data_seconds`` (waiting for the DataLoader: the per-item pipeline and
    collate) and ``model_seconds`` (forward + argmax + count) added to it. Returns (accuracy, correct).
    """
    model.eval()
    correct, n = 0.0, 0.0
    data_s = model_s = 0.0
    with torch.no_grad():
        t = time.perf_counter()
        for batch in loader:
            inputs, labels = batch[0], batch[1]
            t1 = time.perf_counter()
            y = labels
            logits = model(inputs)
            pred = logits.argmax(dim=1, keepdim=True)
            correct += pred.eq(y.view_as(pred)).sum().item()
            n += y.size(0)
            t2 = time.perf_counter()
            data_s += t1 - t
            model_s += t2 - t1
            t = t2
    if timer is not None:
        timer["data_seconds"] = timer.get("data_seconds", 0.0) + data_s
        timer["model_seconds"] = timer.get("model_seconds", 0.0) + model_s
    return correct / n, int(correct)


def official_greedy(pt_paths, model, heldout_loader):
    """Runs the official greedy loop over ``pt_paths`` (individual accuracies measured first).

    Returns a dict: ``indices`` (kept, in order), ``score``, ``correct``, ``individual_scores``,
    ``order``, ``history`` (step, index, score, correct, accepted), ``soup`` (the final state dict),
    and the timings: ``seconds`` (all), ``individual_seconds`` (loading + load_state_dict + full pass
    of every ingredient), ``load_seconds`` (every ``torch.load``), ``mix_seconds`` (running average +
    ``load_state_dict`` per candidate), ``eval_seconds`` (candidate passes, data pipeline included),
    with ``data_seconds``/``model_seconds`` splitting every pass (individual and candidate) into the
    DataLoader's time and the model's; ``bytes_read`` (sizes of the files loaded), ``loads``.
    """
    names = [f"model_{i}" for i in range(len(pt_paths))]
    path_of = dict(zip(names, pt_paths))
    t_all = time.perf_counter()
    timer: dict = {}
    load_s = mix_s = eval_s = 0.0
    bytes_read = loads = 0

    def load(name):
        nonlocal load_s, bytes_read, loads
        t = time.perf_counter()
        sd = torch.load(path_of[name], map_location=torch.device("cpu"))
        load_s += time.perf_counter() - t
        bytes_read += os.path.getsize(path_of[name])
        loads += 1
        return sd

    # Step 2 (the earlier --eval-individual-models run): one full pass per ingredient.
    t_ind = time.perf_counter()
    individual_model_val_accs, individual_correct = {}, {}
    for name in names:
        state_dict = load(name)
        t = time.perf_counter()
        model.load_state_dict(state_dict)
        mix_s += time.perf_counter() - t
        acc, correct = test_model_on_dataset(model, heldout_loader, timer)
        individual_model_val_accs[name] = acc
        individual_correct[name] = correct
    individual_seconds = time.perf_counter() - t_ind
    individual_scores = [individual_model_val_accs[nm] for nm in names]

    # Step 4: Greedy Soup, as in main.py.
    t_search = time.perf_counter()
    load_before = load_s
    individual_mix = mix_s
    individual_data = dict(timer)
    individual_model_val_accs = sorted(individual_model_val_accs.items(), key=operator.itemgetter(1))
    individual_model_val_accs.reverse()
    sorted_models = [x[0] for x in individual_model_val_accs]

    greedy_soup_ingredients = [sorted_models[0]]
    greedy_soup_params = load(sorted_models[0])
    best_val_acc_so_far = individual_model_val_accs[0][1]
    best_correct = individual_correct[sorted_models[0]]
    history = [{"step": 0, "index": names.index(sorted_models[0]), "score": best_val_acc_so_far,
                "correct": best_correct, "accepted": True}]
    for i in range(1, len(names)):
        new_ingredient_params = load(sorted_models[i])
        t = time.perf_counter()
        num_ingredients = len(greedy_soup_ingredients)
        potential_greedy_soup_params = {
            k: greedy_soup_params[k].clone() * (num_ingredients / (num_ingredients + 1.))
            + new_ingredient_params[k].clone() * (1. / (num_ingredients + 1))
            for k in new_ingredient_params
        }
        model.load_state_dict(potential_greedy_soup_params)
        t1 = time.perf_counter()
        held_out_val_accuracy, correct = test_model_on_dataset(model, heldout_loader, timer)
        t2 = time.perf_counter()
        mix_s += t1 - t
        eval_s += t2 - t1
        accepted = held_out_val_accuracy > best_val_acc_so_far
        history.append({"step": i, "index": names.index(sorted_models[i]), "score": held_out_val_accuracy,
                        "correct": correct, "accepted": accepted})
        if accepted:
            greedy_soup_ingredients.append(sorted_models[i])
            best_val_acc_so_far = held_out_val_accuracy
            best_correct = correct
            greedy_soup_params = potential_greedy_soup_params
    end = time.perf_counter()
    return {
        "indices": [names.index(nm) for nm in greedy_soup_ingredients],
        "score": best_val_acc_so_far,
        "correct": best_correct,
        "individual_scores": individual_scores,
        "order": [names.index(nm) for nm in sorted_models],
        "history": history,
        "soup": greedy_soup_params,
        "seconds": end - t_all,
        "individual_seconds": individual_seconds,
        "search_seconds": end - t_search,
        "load_seconds": load_s,
        "load_seconds_search": load_s - load_before,
        "mix_seconds": mix_s - individual_mix,  # candidates only (averaging + load_state_dict)
        "load_state_dict_seconds_individual": individual_mix,
        "eval_seconds": eval_s,  # candidate passes (data pipeline included)
        "data_seconds": timer.get("data_seconds", 0.0),  # all passes
        "model_seconds": timer.get("model_seconds", 0.0),
        "data_seconds_individual": individual_data.get("data_seconds", 0.0),
        "model_seconds_individual": individual_data.get("model_seconds", 0.0),
        "bytes_read": bytes_read,
        "loads": loads,
        "evaluations": len(names) + len(names) - 1,
    }
