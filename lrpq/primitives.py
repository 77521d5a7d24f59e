"""Pure quantization maths: no modules, no state, every function testable on hand-made tensors.

Conventions: uniform quantization is asymmetric, ``q = clamp(round(x / scale) + zero_point, 0, 2^b - 1)``
and ``x̂ = (q - zero_point) * scale``. ``scale`` and ``zero_point`` broadcast against ``x``, so the
same functions serve per-tensor (scalars) and per-channel (shape ``(C, 1, ...)``) parameters.
"""

from __future__ import annotations

import math

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


def quantize_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``x`` on the uniform grid, as floats in [0, 2^b - 1]."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1)


def fake_quant_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize: the value an integer kernel would reproduce."""
    return (quantize_uniform(x, scale, zero_point, bits) - zero_point) * scale


def quantize_log_sqrt2(x: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of non-negative ``x`` on the log√2 grid ``scale · 2^(-q/2)``, plus a mask of values that underflow.

    RepQ-ViT quantizes post-softmax attention this way because the √2 base spends its levels on the
    many small probabilities while still representing values near ``scale`` precisely. Codes past the
    last level (and exact zeros) dequantize to 0.
    """
    ratio = torch.clamp(x / scale, min=0.0)
    codes = torch.round(-2.0 * torch.log2(ratio))  # +inf where x == 0
    underflow = codes >= 2**bits
    return torch.clamp(codes, 0, 2**bits - 1), underflow


def dequantize_log_sqrt2(codes: torch.Tensor, underflow: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale · 2^(-q/2)``, zero where the value underflowed."""
    return torch.where(underflow, torch.zeros_like(codes), scale * torch.exp2(-codes / 2.0))


def fake_quant_log_sqrt2(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Log√2 fake quantization used while calibrating post-softmax activations."""
    codes, underflow = quantize_log_sqrt2(x, scale, bits)
    return dequantize_log_sqrt2(codes, underflow, scale)


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


def fake_quant_log2(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Log√2 quantization evaluated through its log2 (shift + parity) form; equal to the log√2 values."""
    codes, underflow = quantize_log_sqrt2(x, scale, bits)
    shift, parity = log2_shift_form(codes)
    return dequantize_log2(shift, parity, underflow, scale)


def percentile_bounds(
    x: torch.Tensor, percentiles: tuple[float, ...], channel_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower (1-p) and upper (p) quantiles of ``x`` for every ``p``, matching ``torch.quantile`` (linear).

    Extreme quantiles only need the tails, so one ``topk`` per side replaces a full sort; with
    ``channel_dim`` the same call serves every channel at once. Returns tensors of shape ``(P,)``
    per tensor, or ``(P, C)`` per channel, for ``P = len(percentiles)``.
    """
    flat = x.reshape(-1) if channel_dim is None else x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)
    n = flat.shape[-1]
    positions = torch.tensor([p * (n - 1) for p in percentiles], dtype=torch.float64)
    lowest_index = int(torch.floor(positions.min()).item())
    k = n - lowest_index  # enough of the tail to cover every requested position
    top = torch.topk(flat, k, dim=-1, largest=True, sorted=True).values  # descending
    bottom = torch.topk(flat, k, dim=-1, largest=False, sorted=True).values  # ascending
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
