"""Calibration observers: reduce each batch to a few numbers per candidate clipping range.

An observer never stores activations. For every batch it computes the candidate ranges (one per
percentile) and the squared reconstruction error each candidate would cause, and keeps running sums.
At the end the candidate with the least total error wins (per channel when channel-wise), and its
range is the mean of that candidate's per-batch ranges. With a single calibration batch this is
exactly "pick the percentile whose fake-quant output is closest to the float tensor".
"""

from __future__ import annotations

import torch

from lrpq.errors import LrpqError
from lrpq.primitives import fake_quant_log_sqrt2, fake_quant_uniform, percentile_bounds, uniform_qparams


class CalibrationError(LrpqError):
    """Calibration saw something no quantizer can represent (NaN/Inf, no data)."""


class _CandidateObserver:
    """Shared bookkeeping: running sums of candidate bounds and errors across batches."""

    def __init__(self, name: str, bits: int, percentiles: tuple[float, ...], channel_dim: int | None) -> None:
        self.name = name
        self.bits = bits
        self.percentiles = percentiles
        self.channel_dim = channel_dim
        self.batches = 0
        self._lower_sum: torch.Tensor | None = None
        self._upper_sum: torch.Tensor | None = None
        self._error_sum: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.numel() == 0:
            return
        # A finite sum implies finite elements; only a huge-but-finite tensor needs the elementwise check.
        if not (bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())):
            raise CalibrationError(f"non-finite values (NaN/Inf) reached quantization point '{self.name}'")
        lower, upper = percentile_bounds(x, self.percentiles, self.channel_dim)
        errors = self._candidate_errors(x, lower, upper)
        if self._error_sum is None:
            self._lower_sum, self._upper_sum, self._error_sum = lower, upper, errors
        else:
            self._lower_sum += lower
            self._upper_sum += upper
            self._error_sum += errors
        self.batches += 1

    def _candidate_errors(self, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _squared_error(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Squared error of a candidate, per channel when channel-wise; consumes ``x_hat`` as scratch."""
        diff = x_hat.sub_(x).square_()
        if self.channel_dim is None:
            return diff.sum()
        return diff.movedim(self.channel_dim, -1).reshape(-1, diff.shape[self.channel_dim]).sum(0)

    def best_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean range of the least-error candidate (per channel when channel-wise)."""
        if self._error_sum is None:
            raise CalibrationError(f"quantization point '{self.name}' saw no calibration data")
        best = self._error_sum.argmin(dim=0, keepdim=True)
        lower = self._lower_sum.gather(0, best).squeeze(0) / self.batches
        upper = self._upper_sum.gather(0, best).squeeze(0) / self.batches
        return lower, upper


def _broadcast_channels(t: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    """View per-channel values (P, C) as (P, 1, .., C, .., 1) against a tensor of rank ``ndim``."""
    shape = [1] * ndim
    shape[channel_dim] = t.shape[-1]
    return t.reshape(t.shape[0], *shape)


class UniformObserver(_CandidateObserver):
    """Chooses an asymmetric uniform range among percentile candidates, per tensor or per channel."""

    def _candidate_errors(self, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        scale, zero_point = uniform_qparams(lower, upper, self.bits)
        if self.channel_dim is not None:
            scale = _broadcast_channels(scale, x.dim(), self.channel_dim)
            zero_point = _broadcast_channels(zero_point, x.dim(), self.channel_dim)
        buffer = torch.empty_like(x)  # one scratch tensor for every candidate: no allocation per grid
        candidates = zip(scale, zero_point, strict=True)
        return torch.stack(
            [self._squared_error(x, fake_quant_uniform(x, s, z, self.bits, out=buffer)) for s, z in candidates]
        )

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the chosen range."""
        lower, upper = self.best_bounds()
        return uniform_qparams(lower, upper, self.bits)


class LogSqrt2Observer(_CandidateObserver):
    """Chooses the log√2 scale (the largest representable value) among upper-percentile candidates."""

    def __init__(self, name: str, bits: int, percentiles: tuple[float, ...]) -> None:
        super().__init__(name, bits, percentiles, channel_dim=None)

    def _candidate_errors(self, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        scales = torch.clamp(upper, min=1e-8)
        return torch.stack([self._squared_error(x, fake_quant_log_sqrt2(x, s, self.bits)) for s in scales])

    def scale(self) -> torch.Tensor:
        _, upper = self.best_bounds()
        return torch.clamp(upper, min=1e-8)
