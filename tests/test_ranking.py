"""Kendall's τ-b against hand counts of concordant, discordant and tied pairs."""

import math

import numpy as np
import pytest

from lrpq.ranking import kendall_tau


def test_identical_and_reversed_rankings():
    a = np.array([0.1, 0.5, 0.3, 0.9])
    assert kendall_tau(a, a * 7 + 1) == 1.0
    assert kendall_tau(a, -a) == -1.0


def test_hand_counted_pairs_without_ties():
    # a = 1 2 3 4, b = 1 3 2 4: of 6 pairs only (2, 3) is discordant → (5 − 1) / 6.
    assert kendall_tau(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(4 / 6)


def test_ties_use_the_tau_b_denominator():
    # a = 1 1 2, b = 1 2 3: pairs (0,1) tied in a; (0,2) and (1,2) concordant → 2 / √(2·3).
    assert kendall_tau(np.array([1, 1, 2]), np.array([1, 2, 3])) == pytest.approx(2 / math.sqrt(6))


def test_constant_vector_has_no_ranking():
    assert math.isnan(kendall_tau(np.ones(4), np.arange(4)))


def test_lengths_must_match():
    with pytest.raises(ValueError, match="equal length"):
        kendall_tau(np.arange(3), np.arange(4))
