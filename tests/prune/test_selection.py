"""From scores to kept units: per-block counts, global budget with block-relative scores, ties, at least one kept."""

from __future__ import annotations

import numpy as np
import pytest

from lrpq.prune.criteria import UnitScores
from lrpq.prune.selection import best, removed_share, select_structure
from lrpq.prune.structure import StructureError


def scores_of(**blocks: tuple[list[float], list[float]]) -> UnitScores:
    return UnitScores("hand", {name: {"heads": np.array(h), "hidden": np.array(c)} for name, (h, c) in blocks.items()})


def test_best_keeps_the_highest_scores_in_index_order_and_breaks_ties_by_index() -> None:
    assert best(np.array([0.1, 0.9, 0.5, 0.9]), 2) == [1, 3]
    assert best(np.array([0.5, 0.5, 0.5]), 2) == [0, 1]
    assert best(np.array([-1.0, -3.0, 2.0]), 2) == [0, 2]


def test_per_block_keeps_the_rounded_up_share_of_every_block() -> None:
    scores = scores_of(a=([3, 1, 2], [5, 4, 3, 2, 1, 0, 9, 8, 7, 6]), b=([1, 2, 3, 4, 5, 6], list(range(10))))
    structure = select_structure(scores, heads=0.25, mlp=0.3)
    assert structure.blocks["a"].heads == (0, 1, 2)  # ⌈0.75 · 3⌉ = 3: nothing removed
    assert structure.blocks["b"].heads == (1, 2, 3, 4, 5)  # ⌈0.75 · 6⌉ = 5
    assert structure.blocks["a"].hidden == (0, 1, 2, 6, 7, 8, 9)
    assert structure.blocks["b"].hidden == (3, 4, 5, 6, 7, 8, 9)
    assert removed_share(structure, "heads") == pytest.approx(1 / 9)
    assert removed_share(structure, "hidden") == pytest.approx(0.3)


def test_global_ranks_scores_relative_to_their_block_mean() -> None:
    # block a's scores are 100× block b's: raw scores would strip b; relative to the block mean
    # a's one weak unit and b's two weak units are the lowest four … but every block keeps its best
    scores = scores_of(
        a=([100.0, 100.0, 100.0, 1.0], [1.0, 1.0]),
        b=([1.0, 0.1, 0.1, 1.0], [1.0, 1.0]),
    )
    structure = select_structure(scores, heads=0.375, mlp=0.0, ranking="global")  # keep ⌈0.625 · 8⌉ = 5
    assert structure.blocks["a"].heads == (0, 1, 2)
    assert structure.blocks["b"].heads == (0, 3)
    only_one = select_structure(scores, heads=0.9, mlp=0.0, ranking="global")
    assert [len(keep.heads) for keep in only_one.blocks.values()] == [1, 1]
    assert only_one.blocks["b"].heads == (0,)


def test_hidden_widths_round_up_to_a_multiple_with_the_next_best_channels() -> None:
    hidden = [float(i) for i in range(10)]  # channel 9 is the best
    scores = scores_of(a=([1.0], hidden), b=([1.0], hidden[::-1]))
    structure = select_structure(scores, heads=0.0, mlp=0.55, hidden_multiple=4)
    assert structure.blocks["a"].hidden == (2, 3, 4, 5, 6, 7, 8, 9)  # 5 kept → 8
    assert structure.blocks["b"].hidden == (0, 1, 2, 3, 4, 5, 6, 7)
    everything = select_structure(scores, heads=0.0, mlp=0.1, hidden_multiple=8)
    assert len(everything.blocks["a"].hidden) == 10  # 9 kept → 16, capped at the block's 10
    plain = select_structure(scores, heads=0.0, mlp=0.3, ranking="global")
    rounded = select_structure(scores, heads=0.0, mlp=0.3, ranking="global", hidden_multiple=4)
    for name, keep in rounded.blocks.items():
        assert len(keep.hidden) % 4 == 0 and set(plain.blocks[name].hidden) <= set(keep.hidden)
    assert rounded != plain


def test_unknown_ranking_is_refused() -> None:
    with pytest.raises(StructureError, match="ranking"):
        select_structure(scores_of(a=([1.0], [1.0])), 0.5, 0.5, ranking="layer")
