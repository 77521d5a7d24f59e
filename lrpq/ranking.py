"""Rank agreement between two score vectors: Kendall's τ-b, without a statistics dependency.

Relevance rankings have a few dozen to a few hundred layers, so the O(n²) pair count is instant.
"""

from __future__ import annotations

import math

import numpy as np


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's τ-b of two equally long vectors (ties counted as in scipy.stats.kendalltau); NaN if one is constant.

    τ-b = (concordant − discordant) / √((pairs − ties in a)·(pairs − ties in b)): 1 for the same
    ranking, −1 for the reversed one.
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"kendall_tau needs vectors of equal length, got {a.size} and {b.size}")
    upper = np.triu_indices(a.size, k=1)
    sign_a = np.sign(a[:, None] - a[None, :])[upper]
    sign_b = np.sign(b[:, None] - b[None, :])[upper]
    untied_a, untied_b = np.count_nonzero(sign_a), np.count_nonzero(sign_b)
    if untied_a == 0 or untied_b == 0:
        return math.nan
    return float((sign_a * sign_b).sum() / math.sqrt(untied_a * untied_b))
