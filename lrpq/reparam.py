"""Exact rewrites before calibration: post-LN/post-GELU scale folds with CRL clipping, key shifts, head rotations.

RepQ-ViT calibrates the post-LN activation channel-wise (scale ``s_c``, zero point ``z_c``) and then
rewrites the model so that one per-tensor quantizer ``(s̃, z̃)`` reproduces the channel-wise grid:
with ``r_c = s_c / s̃`` and ``b_c = min_c / r_c - miñ`` (``min = -z·s``), the activation
``x' = x / r - b`` maps every channel's range onto the common one. The factors fold exactly into the
LayerNorm affine (``γ' = γ / r``, ``β' = β / r - b``) and the next Linear (``W' = W·diag(r)``,
``bias' = bias + W'·b``), so the float function is unchanged.

CRL (LRP-QViT) clips the per-channel scales and zero points to ``mean ± k·std`` across channels
before computing the factors, and the per-tensor quantizer then uses the target grid ``(s̃, z̃)``
of the clipped channels as it is: an outlier channel keeps part of its range in the activation,
where that grid clips it, instead of multiplying a whole column of the next weight by a large
``r``, which would stretch every output channel's weight range. (Re-fitting the per-tensor grid
on the folded activation instead would let the outliers widen it for every channel.) The target
zero point is rounded to an integer, so the grid is one an integer kernel can use; the fold's
``b`` is computed against that rounded grid, so the mapping stays exact.

Keys can be shifted for free: ``softmax(q·(k - c)ᵀ)`` equals ``softmax(q·kᵀ)`` for any vector ``c``,
because ``q·c`` adds the same number to every score of a query (relative position bias and masks
are added per score, so they keep that property). Shifting every key channel by the centre of its
calibration range, through the key rows of the qkv bias, removes the channel offsets that would
otherwise widen the single per-tensor range of the q·kᵀ operand.

A post-GELU activation (the input of ``mlp.fc2``) has no affine before it to absorb ``1/r`` and
``b``: GELU is not scale-equivariant. The sink then applies ``x / r - b`` itself on its input
(``InputReparam``), before its per-tensor quantizer, and folds ``r`` and ``b`` into its weight and
bias the same way. In an integer pipeline that per-channel affine is the requantization of the
float GELU output, which is elementwise anyway; the GEMM still reads codes on one grid. It matters
for models whose hidden activations have a few outlier channels (DINOv2's reach 15 where the rest
stay below 4): one per-tensor range must either clip them or waste its levels on them.

Heads can be rotated for free too: for an orthogonal ``R``, ``(qR)(kR)ᵀ = q·kᵀ``, and
``attn·(vR) = (attn·v)·R`` is undone by ``proj`` reading its columns through ``R`` (``W' = W·R`` per
head). Both halves are rewrites of the qkv rows and proj columns, done once. A Hadamard ``R`` spreads
each channel over all channels of its head with equal weight, so a few outlier channels of q, k or v
no longer set the one per-tensor range of the q·kᵀ and attn·v operands and of proj's input.

The post-GELU activation cannot be rotated by rewriting fc1 (GELU sits between), so its rotation is
applied online, at fc2's input before the channel fold (``InputReparam``), and undone in fc2's
weight columns. Channel folding gives each channel its own range, but within a channel a few tokens
(DINOv2's class token, in the late blocks) still set it; mixing all channels turns each token's
heavy-tailed vector into near-Gaussian coordinates that one grid covers with less error. The rotation
is Kronecker-factored Hadamard (``lrpq.rotation``): 140 multiply-adds per hidden channel at a 1536
width, against fc2's 384.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lrpq.rotation import (
    KroneckerRotation,
    hadamard_factors,
    kronecker_rotate,
    seeded_orthogonal,
    sylvester_hadamard,
)


def clip_to_mean_std(values: torch.Tensor, k: float | None) -> torch.Tensor:
    """CRL: hold per-channel values within ``mean ± k·std`` across channels (``k=None``: unchanged)."""
    if k is None:
        return values
    mean, std = values.mean(), values.std(unbiased=False)
    return values.clamp(mean - k * std, mean + k * std)


@dataclass(frozen=True)
class FoldFactors:
    """Per-channel ``r`` and ``b`` of ``x' = x / r - b``, and the per-tensor grid they target (integer zero point)."""

    r: torch.Tensor
    b: torch.Tensor
    target_scale: torch.Tensor
    target_zero_point: torch.Tensor


def layerwise_fold_factors(
    channel_scale: torch.Tensor, channel_zero_point: torch.Tensor, clip_k: float | None
) -> FoldFactors:
    """Factors that turn a channel-wise grid into one per-tensor grid (RepQ-ViT Eq. 5–7, CRL-clipped)."""
    scale = clip_to_mean_std(channel_scale, clip_k)
    zero_point = clip_to_mean_std(channel_zero_point, clip_k)
    target_scale, target_zero_point = scale.mean(), zero_point.mean().round()
    r = scale / target_scale
    b = (-zero_point * scale) / r - (-target_zero_point * target_scale)
    return FoldFactors(r, b, target_scale, target_zero_point)


@torch.no_grad()
def fold_into_norm_and_sink(norm: nn.LayerNorm, sink: nn.Linear, factors: FoldFactors) -> None:
    """Rewrite ``norm`` and ``sink`` in place so ``sink(norm(x))`` is unchanged but ``norm`` emits ``x / r - b``."""
    r, b = factors.r.to(norm.weight.dtype), factors.b.to(norm.weight.dtype)
    norm.weight.div_(r)
    norm.bias.div_(r).sub_(b)
    _absorb_in_sink(sink, r, b)


class InputReparam(nn.Module):
    """``(x·R) / r - b`` on a sink's input channels: the half of a fold that has no LayerNorm to live in.

    ``R`` (``rotation``, present only when asked for) is an orthogonal mixing of the channels,
    undone in the sink's weight columns. Starts as the identity (``R = I``, ``r = 1``, ``b = 0``), so
    a prepared model is unchanged until calibration sets the factors, and a saved run loads them back
    as buffers.
    """

    def __init__(
        self,
        channels: int,
        *,
        rotate: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.rotation = KroneckerRotation(channels, device=device, dtype=dtype) if rotate else None
        self.register_buffer("r", torch.ones(channels, device=device, dtype=dtype))
        self.register_buffer("b", torch.zeros(channels, device=device, dtype=dtype))

    def rotate(self, x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The channel mixing alone: what the per-channel fold's statistics are taken on.

        ``out`` (possibly ``x``) receives the rotated values; without a rotation ``x`` is returned.
        """
        return x if self.rotation is None else self.rotation(x, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused multiply-add instead of a division and a subtraction over the widest activation,
        # in place on the rotation's fresh output unless autograd needs it.
        rotated = self.rotate(x)
        in_place = rotated is not x and not rotated.requires_grad
        return torch.addcmul(-self.b, rotated, self.r.reciprocal(), out=rotated if in_place else None)


@torch.no_grad()
def rotate_sink_input(reparam: InputReparam, sink: nn.Linear) -> None:
    """Set ``reparam``'s rotation to ``A ⊗ B`` (``lrpq.rotation``) and give ``sink`` the columns ``W·(A ⊗ B)``.

    Exact in float: ``W·(A ⊗ B)·(x·(A ⊗ B))ᵀ = W·xᵀ`` for orthogonal factors. Call it before the fold,
    whose channel statistics are those of the rotated input.
    """
    if reparam.rotation is None:
        raise ValueError("this InputReparam was built without a rotation (rotate=True)")
    left, right = (factor.to(sink.weight.device) for factor in hadamard_factors(sink.in_features))
    reparam.rotation.set_factors(left, right)
    sink.weight.copy_(kronecker_rotate(sink.weight.double(), left, right))  # each row w ↦ w·(A ⊗ B)


@torch.no_grad()
def fold_into_sink(reparam: InputReparam, sink: nn.Linear, factors: FoldFactors) -> None:
    """Set ``reparam`` to emit ``x / r - b`` and rewrite ``sink`` in place so ``sink(reparam(x))`` is ``sink(x)``."""
    r, b = factors.r.to(sink.weight.dtype), factors.b.to(sink.weight.dtype)
    reparam.r.copy_(r)
    reparam.b.copy_(b)
    _absorb_in_sink(sink, r, b)


def _absorb_in_sink(sink: nn.Linear, r: torch.Tensor, b: torch.Tensor) -> None:
    """Sink half of every fold: ``W' = W·diag(r)``, ``bias' = bias + W'·b``, so ``W'(x/r - b) + bias' = Wx + bias``."""
    sink.weight.mul_(r)
    ensure_bias(sink).add_(sink.weight @ b)


@torch.no_grad()
def shift_keys(qkv: nn.Linear, key_channels: slice, shift: torch.Tensor) -> None:
    """Subtract ``shift`` from every key through the key rows of ``qkv``'s bias (softmax ignores it)."""
    ensure_bias(qkv)[key_channels].sub_(shift.to(qkv.weight.dtype))


def ensure_bias(layer: nn.Linear | nn.Conv2d) -> nn.Parameter:
    """Give ``layer`` a zero bias if it has none: folds and bias correction need one (Swin's ``reduction`` has none)."""
    if layer.bias is None:
        layer.bias = nn.Parameter(
            torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype, device=layer.weight.device)
        )
    return layer.bias


def head_rotation(head_dim: int) -> torch.Tensor:
    """An orthogonal ``head_dim × head_dim`` matrix (float64) that mixes every channel into all others.

    Sylvester's Hadamard matrix over ``√head_dim`` when ``head_dim`` is a power of two (every entry
    ``±1/√d``: one outlier channel lands on all channels equally); otherwise a random orthogonal
    matrix drawn from a fixed seed (``lrpq.rotation``).
    """
    if head_dim < 1:
        raise ValueError(f"head_dim={head_dim} must be a positive integer")
    if head_dim & (head_dim - 1) == 0:
        return sylvester_hadamard(head_dim) / math.sqrt(head_dim)
    return seeded_orthogonal(head_dim)


@torch.no_grad()
def rotate_heads(
    qkv: nn.Linear, proj: nn.Linear | None, num_heads: int, rotation: torch.Tensor, *, query_key: bool = True
) -> None:
    """Rotate every head's queries and keys (if ``query_key``) and, when ``proj`` is given, its values.

    ``qkv`` emits queries, keys and values in thirds, each ``num_heads`` blocks of ``head_dim``
    channels; a rotated output ``o·R`` comes from rows ``Rᵀ·W`` and bias ``Rᵀ·b``. The values' rotation
    is undone in ``proj``'s input columns, ``W_proj·R`` per head.
    """
    parts = ([0, 1] if query_key else []) + ([2] if proj is not None else [])
    head_dim = qkv.out_features // (3 * num_heads)
    rotation = rotation.to(qkv.weight.device, torch.float64)
    weight = qkv.weight.double().view(3, num_heads, head_dim, -1)
    bias = qkv.bias.double().view(3, num_heads, head_dim) if qkv.bias is not None else None
    for part in parts:
        weight[part] = torch.einsum("de,hdc->hec", rotation, weight[part])
        if bias is not None:
            bias[part] = bias[part] @ rotation
    qkv.weight.copy_(weight.view_as(qkv.weight))
    if bias is not None:
        qkv.bias.copy_(bias.view_as(qkv.bias))
    if proj is not None:
        columns = proj.weight.double().view(proj.out_features, num_heads, head_dim)
        proj.weight.copy_((columns @ rotation).view_as(proj.weight))
