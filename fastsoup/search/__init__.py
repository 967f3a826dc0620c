"""The search machinery of the recipes: held-out data prepared once (:mod:`~fastsoup.search.heldout`,
stored by :mod:`~fastsoup.search.store`), evaluation with exact early rejection
(:mod:`~fastsoup.search.evaluation`, hardest-first :mod:`~fastsoup.search.regroup`), the logit cache
(:mod:`~fastsoup.search.cache`) and the shared state of a search (:mod:`~fastsoup.search.search`).
The searches themselves (greedy soup, greedy ensemble, learned soup) are recipes: :mod:`fastsoup.recipes`."""

from .cache import Cache, CacheMismatchError, LogitCache, fingerprint_checkpoint
from .evaluation import Evaluation, evaluate, score_logits
from .heldout import HeldOut, prepare
from .search import Search, SearchStats
from .store import Store, load_heldout

__all__ = ["Cache", "CacheMismatchError", "Evaluation", "HeldOut", "LogitCache", "Search", "SearchStats", "Store",
           "evaluate", "fingerprint_checkpoint", "load_heldout", "prepare", "score_logits"]
