"""Chefer et al.'s elementary relevance rules on plain tensors: z⁺ for linear maps, conserving splits.

Each rule maps relevance at an operation's output to relevance at its inputs and, where the operation
has no bias, conserves the per-image total; the module rules of ``lrpq.relevance.propagation`` are
compositions of these. A layer's LRP-QViT contribution (``layer_contribution``) is here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Stabiliser of every relevance ratio, as in Chefer et al.'s safe_divide.
EPSILON = 1e-9


def safe_divide(numerator: Tensor, denominator: Tensor, eps: float = EPSILON) -> Tensor:
    """numerator / denominator pushed away from zero by ``eps``; 0 where the denominator is exactly 0.

    Relevance ratios R/z blow up where a pre-activation z is tiny; the stabiliser bounds them and
    the zero case drops relevance that no input produced.
    """
    stabilised = torch.copysign(denominator.new_tensor(eps), denominator).add_(denominator)
    return torch.div(numerator, stabilised).masked_fill_(denominator == 0, 0.0)


def zplus_relevance(op: Callable[[Tensor, Tensor], Tensor], x: Tensor, weight: Tensor, r: Tensor) -> Tensor:
    """z⁺ (α1β0) rule for a linear map ``op(x, weight)``: only the positive terms x·w share relevance.

    Positive terms are x⁺w⁺ and x⁻w⁻; each input receives its share of R/z along them. The bias is
    left out so the rule conserves: sum(result) == sum(r) wherever z > 0.
    """
    x, weight = x.detach(), weight.detach()
    with torch.enable_grad():
        pos_x = x.clamp(min=0).requires_grad_()
        neg_x = x.clamp(max=0).requires_grad_()
        z = op(pos_x, weight.clamp(min=0)) + op(neg_x, weight.clamp(max=0))
        grad_pos, grad_neg = torch.autograd.grad(z, (pos_x, neg_x), safe_divide(r, z.detach()))
    return pos_x.detach() * grad_pos + neg_x.detach() * grad_neg


def zplus_linear(x: Tensor, weight: Tensor, r: Tensor) -> Tensor:
    """``zplus_relevance`` of ``F.linear`` with its two vector-Jacobian products written out.

    The input gradients of ``x⁺W⁺ᵀ + x⁻W⁻ᵀ`` are ``(R/z)·W⁺`` and ``(R/z)·W⁻``, so no autograd graph
    is built; the same four products, on buffers this function owns and reuses in place.
    """
    x, weight = x.detach(), weight.detach()
    pos_w, neg_w = weight.clamp(min=0), weight.clamp(max=0)
    pos_x, neg_x = x.clamp(min=0), x.clamp(max=0)
    s = safe_divide(r, F.linear(pos_x, pos_w).add_(F.linear(neg_x, neg_w)))
    return pos_x.mul_(s @ pos_w).add_(neg_x.mul_(s @ neg_w))


def _per_sample_sum(t: Tensor) -> Tensor:
    """(B,) sums over everything but the leading dimension."""
    return t.reshape(t.shape[0], -1).sum(1)


def _per_sample_scale(t: Tensor, scale: Tensor) -> Tensor:
    return t * scale.view(-1, *[1] * (t.ndim - 1))


def _conserving_pair(a: Tensor, b: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale two operands' relevances so together they hold exactly sum(r), split by |sum| share.

    Gradient×input gives each operand of a bilinear product the full relevance (2R in total) and
    the operands of an add an unbounded one when they nearly cancel; this is Chefer's Add fix.
    """
    a_sum, b_sum, total = _per_sample_sum(a), _per_sample_sum(b), _per_sample_sum(r)
    share = a_sum.abs() + b_sum.abs()
    a_target = safe_divide(a_sum.abs(), share) * total
    b_target = safe_divide(b_sum.abs(), share) * total
    return (
        _per_sample_scale(a, safe_divide(a_target, a_sum)),
        _per_sample_scale(b, safe_divide(b_target, b_sum)),
    )


def add_relevance(a: Tensor, b: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Split the relevance of ``a + b`` between its operands (gradient×input, then conserved)."""
    s = safe_divide(r, a + b)
    return _conserving_pair(a * s, b * s, r)


def matmul_relevance(a: Tensor, b: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Split the relevance of ``a @ b`` between its operands (gradient×input, then conserved)."""
    s = safe_divide(r, a @ b)
    return _conserving_pair(a * (s @ b.transpose(-2, -1)), b * (a.transpose(-2, -1) @ s), r)


def layer_contribution(grad: Tensor, relevance: Tensor, images: int) -> Tensor:
    """LRP-QViT's per-image contribution of a layer: ``mean((∇A ⊙ R)⁺)`` over its output ``A``, shape (images,).

    The positive part is taken of the product, not of ``R`` first: an element whose gradient and
    relevance are both negative supports the prediction as much as one where both are positive.
    ``A`` leads with the image dimension, or with images × windows (Swin's attention), image-major.
    """
    return (grad * relevance).clamp(min=0).reshape(images, -1).mean(1).detach()


def clone_relevance(*relevances: Tensor) -> Tensor:
    """A tensor read by several consumers gets the sum of the relevance each consumer hands back.

    Added one by one (for two, bit for bit the stacked sum): stacking copied every operand first, 5 % of
    ref-B's relevance time.
    """
    total = relevances[0]
    for relevance in relevances[1:]:
        total = total + relevance
    return total


def move_relevance(source: Tensor, moved: Tensor, r: Tensor) -> Tensor:
    """Carry relevance on ``moved`` back to ``source`` through ops that only move elements.

    Reshape, roll, pad and window partition are 0/1 linear maps, so their vector-Jacobian product
    is the exact inverse placement; the recorded autograd graph supplies it without re-deriving it.
    """
    return torch.autograd.grad(moved, source, r, retain_graph=True)[0]


def mean_pool_relevance(x: Tensor, r: Tensor, dims: int | Sequence[int]) -> Tensor:
    """z⁺ rule of a mean over ``dims``: positive inputs share each output's relevance by size."""
    pos = x.clamp(min=0)
    total = pos.sum(dims, keepdim=True)
    return pos * safe_divide(r.reshape(total.shape), total)
