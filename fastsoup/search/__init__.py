"""The cached-logit greedy search: held-out data prepared once, a logit cache and decision journal,
and the greedy soup / greedy ensemble loops. Imports torch (model evaluation needs it)."""

from .cache import CacheMismatchError, LogitCache, fingerprint_checkpoint
from .greedy import EnsembleResult, GreedyResult, Search, SearchStats, ensemble_logits, greedy_ensemble, greedy_soup
from .heldout import HeldOut, evaluate, prepare

__all__ = [
    "CacheMismatchError", "EnsembleResult", "GreedyResult", "HeldOut", "LogitCache", "Search", "SearchStats",
    "ensemble_logits", "evaluate", "fingerprint_checkpoint", "greedy_ensemble", "greedy_soup", "prepare",
]
