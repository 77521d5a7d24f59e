"""Relevance scores → bit plan: the "mixed" in ``lrpq quantize --mixed``.

Only layers inside transformer blocks (and Swin's patch-merging ``reduction``, weighed with the block
it feeds) take part in the allocation; the patch embedding and the classifier head are scored for the
report but keep the default widths, as in LRP-QViT.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import nn

from lrpq.allocation.solvers import AllocationError, check_widths, make_bit_plan
from lrpq.config import MAX_PRIMITIVE_BITS, MIN_PRIMITIVE_BITS, BitPlan
from lrpq.relevance import LayerScores, compute_layer_scores

DEFAULT_RELEVANCE_IMAGES = 32
DEFAULT_WIDTHS = (3, 6)


def widths_for(wbits: float, abits: float, widths: tuple[int, int] | None = None) -> tuple[int, int]:
    """The allowed widths for mean-bits targets ``wbits`` and ``abits``.

    Given ``widths`` are checked against the primitives and the targets up front (the sensitivity
    allocator would otherwise find out only after minutes of measurement). By default 3–6, widened
    to ``ceil(t) − 1 … floor(t) + 1``: one bit either side of an integer target, so the paper rule
    can raise and lower around W3 and W6 too, and the neighbouring integers of a fractional one.
    """
    targets = (wbits, abits)
    if widths is not None:
        lo, hi = check_widths(widths)
        outside = [target for target in targets if not lo <= target <= hi]
        if outside:
            raise AllocationError(f"target {outside[0]} bits is outside the allowed widths {lo}–{hi}; widen them")
        return lo, hi
    low = max(MIN_PRIMITIVE_BITS, min(DEFAULT_WIDTHS[0], *(math.ceil(t) - 1 for t in targets)))
    return low, min(MAX_PRIMITIVE_BITS, max(DEFAULT_WIDTHS[1], *(math.floor(t) + 1 for t in targets)))


ALLOCATION_EXCLUDED_BLOCKS = ("patch_embed", "head")


def allocatable(scores: LayerScores) -> LayerScores:
    """The scores of layers inside blocks, without the patch embedding and head groups."""
    kept = {
        name: score for name, score in scores.scores.items() if scores.block_of[name] not in ALLOCATION_EXCLUDED_BLOCKS
    }
    return LayerScores(
        scores=kept,
        block_of={name: scores.block_of[name] for name in kept},
        block_order=[block for block in scores.block_order if block not in ALLOCATION_EXCLUDED_BLOCKS],
        num_images=scores.num_images,
    )


def _has_weights(model: nn.Module, name: str) -> bool:
    """Scored layers that exist as modules with a weight (matmul1/matmul2 are products, not modules)."""
    try:
        return hasattr(model.get_submodule(name), "weight")
    except AttributeError:
        return False


def allocate_from_scores(
    scores: LayerScores,
    weight_layers: Collection[str],
    *,
    wbits: float,
    abits: float,
    allocator: str = "paper",
    widths: tuple[int, int] | None = None,
) -> BitPlan:
    """Allocate weight bits over ``weight_layers`` and activation bits over every block layer."""
    kept = allocatable(scores)
    return make_bit_plan(
        kept.relative(),
        kept.block_of,
        kept.block_order,
        wbits=wbits,
        abits=abits,
        weight_layers=[name for name in kept.scores if name in set(weight_layers)],
        allocator=allocator,
        widths=widths_for(wbits, abits, widths),
    )


def plan_from_scores(
    model: nn.Module,
    scores: LayerScores,
    *,
    wbits: float,
    abits: float,
    allocator: str = "paper",
    widths: tuple[int, int] | None = None,
) -> BitPlan:
    """Allocate the bits of every block layer of ``model`` from its relative importance."""
    weight_layers = [name for name in scores.scores if _has_weights(model, name)]
    return allocate_from_scores(scores, weight_layers, wbits=wbits, abits=abits, allocator=allocator, widths=widths)


def relevance_bit_plan(
    model: nn.Module,
    images: torch.Tensor,
    *,
    wbits: float,
    abits: float,
    allocator: str = "paper",
    widths: tuple[int, int] | None = None,
    progress: bool = True,
) -> tuple[BitPlan, LayerScores]:
    """Score ``model`` (float) on ``images`` and allocate bits; returns the plan and the scores."""
    scores = compute_layer_scores(model, images, progress=progress)
    return plan_from_scores(model, scores, wbits=wbits, abits=abits, allocator=allocator, widths=widths), scores
