"""Differentiable stand-ins for the fake-quant primitives, used only while recovery trains.

``torch.round`` has a zero gradient, so the inference functions of ``lrpq.primitives`` stop every
gradient at a quantizer. Here rounding passes its gradient straight through (STE) inside the grid
and stops it where a value is clipped, and a grid's scale gets LSQ's gradient (Esser et al. 2020):
``d x̂ / d s = round(x/s) − x/s`` inside the grid, the clipped level outside. The forward values are
those of the inference functions, so what recovery trains is what the run will compute.
"""

from __future__ import annotations

import torch

from lrpq.primitives import fake_quant_log2

# AdaRound's rectified sigmoid stretches σ to (γ, ζ) and clips it to [0, 1], so h reaches 0 and 1 exactly.
STRETCH_LOW, STRETCH_HIGH = -0.1, 1.1


class _UniformSTE(torch.autograd.Function):
    """``fake_quant_uniform`` forward; STE for ``x`` inside the grid, LSQ for the scale, in a few passes.

    Autograd through the written-out formula takes about three times the elementwise passes (and
    saved tensors) of this, on activations as large as a ViT's attention and hidden layers.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        bits: int,
        weight: torch.Tensor | None,
        shift: torch.Tensor | None,
    ) -> torch.Tensor:
        low = -float(zero_point)
        high = 2**bits - 1 + low
        inverse = scale.reciprocal()
        # The ratio exactly as ``fake_quant_uniform`` forms it (with ``affine=(weight, shift)`` folded in): a
        # code one ulp away from inference's flips a level, and on a 4-bit ViT a few such flips in one block
        # moved ref-B's logits by up to 6.5.
        ratio = x * inverse if weight is None else torch.addcmul(shift * inverse, x, weight * inverse)
        codes = torch.round(ratio)
        inside = (codes >= low) & (codes <= high)
        codes.clamp_(low, high)
        # d x̂ / d s: the code less the ratio inside the grid (the rounding residual), the clamped code outside.
        slope = torch.where(inside, codes - ratio, codes) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(inside, slope, weight)
        return codes.mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inside, slope, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * inside if weight is None else grad * inside * weight
        grad_scale = (grad * slope).sum().reshape(()) if slope is not None else None
        return grad_x, grad_scale, None, None, None, None


class _Log2STE(torch.autograd.Function):
    """``fake_quant_log2`` forward; ``x``'s gradient passes below the top level, the scale's is level / scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        values = fake_quant_log2(x, scale, bits)
        ctx.save_for_backward(x <= scale, values if ctx.needs_input_grad[1] else None, scale)
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inside, values, scale = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_scale = ((grad * values).sum() / scale).reshape(()) if values is not None else None
        return grad_x, grad_scale, None


def fake_quant_uniform_ste(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    affine: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``clamp(round(x/s), −z, 2^b − 1 − z) · s`` with STE rounding and LSQ's scale gradient (per-tensor grid).

    ``affine=(w, c)`` quantizes ``x·w + c`` with the values of ``fake_quant_uniform``'s ``affine`` bit for bit
    (``x``'s gradient is then scaled by ``w``). The zero point and the map are constants: only the scale (and
    ``x``) receive gradients.
    """
    weight, shift = affine if affine is not None else (None, None)
    return _UniformSTE.apply(x, scale, zero_point, bits, weight, shift)


def fake_quant_log2_ste(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The log2-form values of ``fake_quant_log2``; ``x``'s gradient passes where ``x`` is within the top level.

    A level is ``s · 2^(−q/2)``, so with the codes held its derivative in ``s`` is the level over ``s``.
    """
    return _Log2STE.apply(x, scale, bits)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's ``h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1)``: 0.5 at V = 0, exactly 0 or 1 for |V| ≳ 2.4."""
    return torch.clamp(torch.sigmoid(v) * (STRETCH_HIGH - STRETCH_LOW) + STRETCH_LOW, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """The ``V`` with ``h(V) = h`` for ``h`` in [0, 1] (finite at both ends thanks to the stretch)."""
    p = (h - STRETCH_LOW) / (STRETCH_HIGH - STRETCH_LOW)
    return torch.log(p) - torch.log1p(-p)
