"""Merge methods beyond the soup: the specs the native kernels implement bit for bit, DARE's
counter-based random numbers (``rng``) and the exact bounded-memory top-k selection of TIES and
breadcrumbs (``select``). Nothing here imports torch."""
