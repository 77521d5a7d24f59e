"""Relevance scores → bit plan: the "mixed" in ``lrpq quantize --mixed``.

Only layers inside transformer blocks (and Swin's patch-merging ``reduction``) take part in the
allocation; the patch embedding and the classifier head are scored for the report but keep the
default widths, as in LRP-QViT.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from lrpq.allocate import make_bit_plan
from lrpq.config import MAX_PRIMITIVE_BITS, MIN_PRIMITIVE_BITS, BitPlan
from lrpq.relevance import LayerScores, compute_layer_scores

DEFAULT_RELEVANCE_IMAGES = 32
DEFAULT_WIDTHS = (3, 6)


def widths_for(wbits: int, abits: int, widths: tuple[int, int] | None = None) -> tuple[int, int]:
    """The allowed widths: 3–6 by default, widened to target ± 1 so the paper rule can move every target."""
    if widths is not None:
        return widths
    low = max(MIN_PRIMITIVE_BITS, min(DEFAULT_WIDTHS[0], wbits - 1, abits - 1))
    return low, min(MAX_PRIMITIVE_BITS, max(DEFAULT_WIDTHS[1], wbits + 1, abits + 1))


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
    wbits: int,
    abits: int,
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
    wbits: int,
    abits: int,
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
    wbits: int,
    abits: int,
    allocator: str = "paper",
    widths: tuple[int, int] | None = None,
    progress: bool = True,
) -> tuple[BitPlan, LayerScores]:
    """Score ``model`` (float) on ``images`` and allocate bits; returns the plan and the scores."""
    scores = compute_layer_scores(model, images, progress=progress)
    return plan_from_scores(model, scores, wbits=wbits, abits=abits, allocator=allocator, widths=widths), scores
