"""From unit scores to a pruned structure: which heads and hidden channels each block keeps.

- ``per-block`` (default): each block keeps its ⌈(1 − f)·units⌉ best units of each kind, so every
  block loses the same share (rounded up to whole units kept: 25 % of 3 heads keeps all 3, of 6 heads 5).
- ``global``: each kind keeps ⌈(1 − f)·total⌉ units over all blocks, the best by score relative to
  the mean |score| of the unit's block and kind. Raw scores are not comparable across blocks (weight
  norms and reconstruction Grams scale with the layer, relevance with depth), so a unit is compared
  with its block's average unit; a block whose units are uneven loses more of them. Each block keeps
  at least its best unit.

``hidden_multiple`` N > 1 then rounds every block's kept hidden channels up to a multiple of N (or
all of them), adding the block's next best: a hardware-friendly width, and one the hidden rotation of
``lrpq quantize`` can factor into small Hadamard matrices. ⌈0.7 · 768⌉ = 538 = 2 · 269 has no such
factorisation, so each block would store a dense 269 × 269 rotation factor with the quantized model
(on ref-A's six blocks 1.7 MB, more than the W4 weights it saves); 544 = 32 · 17 uses 68 × 68 and 8 × 8.

Ties go to the lower index; kept indices are in ascending order, so the pruned block keeps the
order of its units.
"""

from __future__ import annotations

import math

import numpy as np

from lrpq.prune.criteria import UnitScores
from lrpq.prune.structure import UNIT_KINDS, BlockKeep, PrunedStructure, StructureError, kept_count

RANKINGS = ("per-block", "global")


def best(scores: np.ndarray, count: int) -> list[int]:
    """Indices of the ``count`` highest scores (ties: lower index first), ascending."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores)))
    return sorted(order[:count].tolist())


def _global_keep(scores: dict[str, np.ndarray], fraction: float) -> dict[str, list[int]]:
    """Each block's kept units when ⌈(1 − fraction)·total⌉ are kept over all blocks by block-relative score."""
    total = sum(len(s) for s in scores.values())
    budget = max(kept_count(total, fraction), len(scores))
    kept = {name: best(s, 1) for name, s in scores.items()}  # every block keeps its best unit
    candidates = []
    for position, (name, s) in enumerate(scores.items()):
        scale = float(np.abs(s).mean()) or 1.0
        candidates += [(-s[i] / scale, position, i, name) for i in range(len(s)) if i != kept[name][0]]
    for _, _, index, name in sorted(candidates)[: budget - len(scores)]:
        kept[name].append(index)
    return {name: sorted(indices) for name, indices in kept.items()}


def rounded_up(kept: list[int], scores: np.ndarray, multiple: int) -> list[int]:
    """``kept`` plus the next best of ``scores`` until their count is a multiple of ``multiple`` (or all)."""
    count = min(len(scores), math.ceil(len(kept) / multiple) * multiple)
    chosen = set(kept)
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores)))
    extra = [int(i) for i in order if int(i) not in chosen][: count - len(kept)]
    return sorted(kept + extra)


def select_structure(
    scores: UnitScores, heads: float, mlp: float, ranking: str = "per-block", hidden_multiple: int = 1
) -> PrunedStructure:
    """Remove ``heads`` of the heads and ``mlp`` of the hidden channels, ranked ``ranking``-wise by ``scores``."""
    if ranking not in RANKINGS:
        raise StructureError(f"ranking {ranking!r} is unknown; use one of: {', '.join(RANKINGS)}")
    if hidden_multiple < 1:
        raise StructureError(f"hidden_multiple {hidden_multiple} must be a positive number of channels")
    fractions = {"heads": heads, "hidden": mlp}
    kept: dict[str, dict[str, list[int]]] = {name: {} for name in scores.blocks}
    for kind in UNIT_KINDS:
        by_block = {name: block[kind] for name, block in scores.blocks.items()}
        if ranking == "global":
            chosen = _global_keep(by_block, fractions[kind])
        else:
            chosen = {name: best(s, kept_count(len(s), fractions[kind])) for name, s in by_block.items()}
        for name, indices in chosen.items():
            multiple = hidden_multiple if kind == "hidden" else 1
            kept[name][kind] = rounded_up(indices, by_block[name], multiple) if multiple > 1 else indices
    return PrunedStructure(
        {
            name: BlockKeep(len(scores.blocks[name]["heads"]), len(scores.blocks[name]["hidden"]), **k)
            for name, k in kept.items()
        }
    )


def removed_share(structure: PrunedStructure, kind: str) -> float:
    """The share of all units of ``kind`` the structure removes (what a fraction became after rounding)."""
    total = sum(k.num_heads if kind == "heads" else k.hidden_features for k in structure.blocks.values())
    return sum(k.removed(kind) for k in structure.blocks.values()) / total
