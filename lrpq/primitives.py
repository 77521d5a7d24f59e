"""Pure quantization maths: no modules, no state, every function testable on hand-made tensors.

Conventions: uniform quantization is asymmetric, ``q = clamp(round(x / scale) + zero_point, 0, 2^b - 1)``
and ``x̂ = (q - zero_point) * scale``. ``scale`` and ``zero_point`` broadcast against ``x``, so the
same functions serve per-tensor (scalars) and per-channel (shape ``(C, 1, ...)``) parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SQRT2 = math.sqrt(2.0)
_MIN_SCALE = 1e-8


def uniform_qparams(x_min: torch.Tensor, x_max: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point mapping [x_min, x_max] (widened to contain 0) onto 0..2^b-1.

    The range is widened to contain zero so that exact zeros (padding, ReLU-like outputs) stay exact.
    """
    levels = 2**bits - 1
    x_min = torch.clamp(x_min, max=0.0)
    x_max = torch.clamp(x_max, min=0.0)
    scale = torch.clamp((x_max - x_min) / levels, min=_MIN_SCALE)
    zero_point = torch.clamp(torch.round(-x_min / scale), 0, levels)
    return scale, zero_point


def quantize_uniform(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    *,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer codes of ``x`` on the uniform grid, as floats in [0, 2^b - 1].

    ``offset`` (levels, shaped like ``x``) moves each code from the nearest level to a chosen one, as
    GPTQ's rounding does. ``x / scale`` is taken as ``x · (1 / scale)``, as in ``fake_quant_uniform``,
    so codes and fake-quantized values always agree.
    """
    levels = 2**bits - 1
    codes = torch.clamp(torch.round(x * scale.reciprocal()) + zero_point, 0, levels)
    return codes if offset is None else codes.add_(offset).clamp_(0, levels)


def fake_quant_uniform(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    *,
    offset: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    affine: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Quantize then dequantize: the value an integer kernel would reproduce (``offset`` as in ``quantize_uniform``).

    Evaluated as ``clamp(round(x / scale), -zero_point, 2^b - 1 - zero_point) · scale`` in place on one
    buffer. The zero point is an integer, so moving it into the clamp bounds is exact and the values
    equal ``(quantize_uniform(...) - zero_point) · scale``; it is one allocation and four passes instead
    of six of each, which is most of the cost of fake-quant inference on large activations. A single
    zero point clamps with number bounds, which ATen runs about ten times faster than tensor bounds.
    ``out`` (shaped like the result) lets a caller that evaluates many grids reuse one buffer.
    ``x / scale`` is taken as ``x · (1 / scale)``: a vector division costs several multiplications
    on a CPU, and the two differ by at most one rounding of the quotient, so a code can change only
    for a value within an ulp of a rounding boundary, which calibration and inference share anyway.
    ``affine=(w, c)`` fake-quantizes ``x·w + c`` (a fold's per-channel map) with the map folded into
    the first pass, ``x·(w / s) + c / s``: one pass fewer; a code can differ from quantizing the mapped
    tensor only where ``x·w + c`` lies within a few ulps of a rounding boundary.
    """
    levels = 2**bits - 1
    inverse = scale.reciprocal()
    if affine is None:
        codes = torch.mul(x, inverse, out=out).round_()
    else:
        weight, bias = affine
        codes = torch.addcmul(bias * inverse, x, weight * inverse, out=out).round_()
    _clamp_centred_codes(codes, zero_point, levels)
    if offset is not None:
        _clamp_centred_codes(codes.add_(offset), zero_point, levels)
    return codes.mul_(scale)


def _clamp_centred_codes(codes: torch.Tensor, zero_point: torch.Tensor, levels: int) -> None:
    """Clamp codes less their zero point to the grid, in place; a single zero point as number bounds.

    Number bounds only where the zero point lives on the CPU: on an accelerator reading it would wait
    for the device at every call, and tensor bounds cost nothing extra there.
    """
    if zero_point.numel() == 1 and zero_point.device.type == "cpu":
        low = -float(zero_point)
        codes.clamp_(low, levels + low)
    else:
        codes.clamp_min_(-zero_point).clamp_max_(levels - zero_point)


def _codes_of_ratio(ratio: torch.Tensor, bits: int) -> torch.Tensor:
    """``round(-2·log2(ratio))`` (negative ratios count as 0) clamped to [0, 2^b], in place; 2^b is underflow."""
    return ratio.clamp_(min=0.0).log2_().mul_(-2.0).round_().clamp_(0, 2**bits)


def _log_codes(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Log√2 codes of ``x / scale`` clamped to [0, 2^b], on one buffer; 2^b marks underflow."""
    return _codes_of_ratio(torch.mul(x, scale.reciprocal()), bits)


def quantize_log_sqrt2(x: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of non-negative ``x`` on the log√2 grid ``scale · 2^(-q/2)``, plus a mask of values that underflow.

    RepQ-ViT quantizes post-softmax attention this way because the √2 base spends its levels on the
    many small probabilities while still representing values near ``scale`` precisely. Codes past the
    last level (and exact zeros) dequantize to 0.
    """
    codes = _log_codes(x, scale, bits)
    underflow = codes == 2**bits
    return codes.clamp_(max=2**bits - 1), underflow


def dequantize_log_sqrt2(codes: torch.Tensor, underflow: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale · 2^(-q/2)``, zero where the value underflowed."""
    return torch.where(underflow, torch.zeros_like(codes), scale * torch.exp2(-codes / 2.0))


_GATHER_PIECE = 1 << 22  # elements per index of ``_log_grid_values``' gather (16 MiB of int32)


def _log_grid_values(
    x: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    dequantize: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` on a log grid whose levels ``dequantize(codes, underflow, scale)`` gives.

    With a per-tensor scale there are only 2^b + 1 possible outputs (and NaN), so they are computed
    once with the same elementwise formula and gathered by code into the codes' own buffer: nine
    passes over ``x`` and two allocations, where the formula takes 13 (log√2) or 21 (log2 form) of
    each, on post-softmax attention, the largest activation of a ViT. (``torch.bucketize`` on
    precomputed bounds takes three passes, but in deit_s inference its binary search made the whole
    model slower on an idle machine and no faster on a loaded one.) ``out`` (contiguous, shaped like
    ``x``, possibly ``x`` itself) holds the codes instead of a fresh buffer.
    """
    top = 2**bits
    codes = _codes_of_ratio(torch.mul(x, scale.reciprocal(), out=out).contiguous(), bits)
    if scale.numel() != 1:
        return dequantize(codes.clamp(max=top - 1), codes == top, scale)
    levels = torch.arange(top, dtype=codes.dtype, device=codes.device)
    grid = dequantize(levels, torch.zeros_like(levels, dtype=torch.bool), scale).reshape(-1)
    table = torch.cat([grid, grid.new_tensor([0.0, math.nan])])  # code 2^b underflows to 0; NaN stays NaN
    codes.nan_to_num_(nan=top + 1)
    if codes.requires_grad:  # out= cannot record autograd
        return table.index_select(0, codes.to(torch.int32).view(-1)).view(codes.shape)
    # Gathered piece by piece, each piece's int32 index a temporary of 16 MiB: one index for the whole tensor
    # was a second buffer as large as post-softmax attention, the peak of ref-B's calibration (336 → 304 MiB),
    # and at this size the pieces are also faster (ref-B's attention of 32 images: 69 → 52 ms); 1 M-element
    # pieces were slower than one index (0.20 against 0.15 s, both under load).
    for piece in codes.view(-1).split(_GATHER_PIECE):
        torch.index_select(table, 0, piece.to(torch.int32), out=piece)
    return codes


def fake_quant_log_sqrt2(
    x: torch.Tensor, scale: torch.Tensor, bits: int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Log√2 fake quantization used while calibrating post-softmax activations."""
    return _log_grid_values(x, scale, bits, dequantize_log_sqrt2, out)


def log2_shift_form(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split log√2 codes into a power-of-two shift and a parity bit (RepQ-ViT's log2 reparameterization).

    ``2^(-q/2) = 2^(-ceil(q/2)) · (1 + parity(q) · (√2 - 1))``: the first factor is a bit shift, the
    second selects one of two per-tensor scales, so inference needs only shifts and two multipliers.
    """
    shift = torch.ceil(codes / 2.0)
    parity = codes - 2.0 * torch.floor(codes / 2.0)
    return shift, parity


def dequantize_log2(
    shift: torch.Tensor, parity: torch.Tensor, underflow: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Inference form of the log√2 grid: ``2^(-shift) · (scale + parity · scale (√2 - 1))``."""
    odd_scale = scale * (SQRT2 - 1.0)
    value = torch.ldexp(scale + parity * odd_scale, -shift.to(torch.int32))
    return torch.where(underflow, torch.zeros_like(value), value)


def _dequantize_log2_codes(codes: torch.Tensor, underflow: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shift, parity = log2_shift_form(codes)
    return dequantize_log2(shift, parity, underflow, scale)


def fake_quant_log2(
    x: torch.Tensor, scale: torch.Tensor, bits: int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Log√2 quantization evaluated through its log2 (shift + parity) form; equal to the log√2 values."""
    return _log_grid_values(x, scale, bits, _dequantize_log2_codes, out)


_PIECES = 64
_MIN_PIECE = 1 << 12


def _tail(flat: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The ``k`` largest (or smallest) values along the last dim, sorted from the extreme inwards.

    ``topk`` over one long row runs on a single thread and costs about as much for k = 10 as for
    k = 10⁴. A long 1-D row is therefore cut into pieces whose few extreme values are taken in
    parallel, and the answer is the extreme ``k`` of their union. That is exact when no piece dropped
    a value beyond the union's k-th (the dropped values of a piece never pass its last kept one);
    pieces where that fails (outliers packed into a few tokens) are redone with their own top ``k``,
    which cannot miss anything.
    """
    n = flat.shape[-1]
    per_piece = 2 * math.ceil(k / _PIECES) + 32  # twice the share of an evenly spread tail, plus slack
    if flat.dim() != 1 or n < _PIECES * _MIN_PIECE or per_piece * 4 > n // _PIECES:
        return torch.topk(flat, k, largest=largest, sorted=True).values
    body = flat[: n - n % _PIECES].view(_PIECES, -1)
    rest = flat[body.numel() :]
    kept = torch.topk(body, per_piece, dim=1, largest=largest, sorted=False).values
    answer = torch.topk(torch.cat([kept.reshape(-1), rest]), k, largest=largest, sorted=True).values
    weakest = kept.amin(1) if largest else kept.amax(1)
    missed = weakest > answer[-1] if largest else weakest < answer[-1]
    if not bool(missed.any()):
        return answer
    redone = torch.topk(body[missed], min(k, body.shape[1]), dim=1, largest=largest, sorted=False).values
    union = torch.cat([kept[~missed].reshape(-1), redone.reshape(-1), rest])
    return torch.topk(union, k, largest=largest, sorted=True).values


def percentile_bounds(
    x: torch.Tensor, percentiles: tuple[float, ...], channel_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower (1-p) and upper (p) quantiles of ``x`` for every ``p``, matching ``torch.quantile`` (linear).

    Extreme quantiles only need the tails, so one ``topk`` per side (see ``_tail``) replaces a full
    sort; with ``channel_dim`` the same call serves every channel at once. Returns tensors of shape
    ``(P,)`` per tensor, or ``(P, C)`` per channel, for ``P = len(percentiles)``.
    """
    flat = x.reshape(-1) if channel_dim is None else x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)
    n = flat.shape[-1]
    positions = torch.tensor([p * (n - 1) for p in percentiles], dtype=torch.float64, device=x.device)
    lowest_index = math.floor(min(p * (n - 1) for p in percentiles))
    k = n - lowest_index  # enough of the tail to cover every requested position
    top = _tail(flat, k, largest=True)  # descending
    bottom = _tail(flat, k, largest=False)  # ascending
    lo_idx = torch.floor(positions).long()
    hi_idx = torch.ceil(positions).long()
    frac = (positions - lo_idx).to(x.dtype)
    frac = frac.view(-1, *([1] * (top.dim() - 1)))

    def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return t.index_select(-1, index).movedim(-1, 0)

    # Upper tail: ascending position j sits at descending index n-1-j.
    upper_lo, upper_hi = take(top, n - 1 - lo_idx), take(top, n - 1 - hi_idx)
    upper = upper_lo + frac * (upper_hi - upper_lo)
    # Lower tail: quantile 1-p sits at ascending position (n-1) - p(n-1).
    lower_lo, lower_hi = take(bottom, n - 1 - hi_idx), take(bottom, n - 1 - lo_idx)
    lower = lower_hi - frac * (lower_hi - lower_lo)
    return lower, upper
