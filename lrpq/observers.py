"""Calibration observers: reduce each batch to a few numbers per candidate clipping range.

An observer never stores activations. For every batch it computes the candidate ranges (one per
percentile) and the squared reconstruction error each candidate would cause, and keeps running sums.
At the end the candidate with the least total error wins (per channel when channel-wise), and its
range is the mean of that candidate's per-batch ranges. With a single calibration batch this is
exactly "pick the percentile whose fake-quant output is closest to the float tensor".

``update(x, weight)`` weighs each element's squared error (the candidate ranges still come from ``x``
alone): with the squared output sensitivity of every element (``lrpq.output_weighted_ranges``) the choice
minimises the first-order error at the model output rather than in the tensor itself.
"""

from __future__ import annotations

import torch

from lrpq.errors import LrpqError
from lrpq.primitives import fake_quant_log_sqrt2, fake_quant_uniform, percentile_bounds, uniform_qparams


class CalibrationError(LrpqError):
    """Calibration saw something no quantizer can represent (NaN/Inf, no data)."""


def require_finite(x: torch.Tensor, where: str) -> None:
    """Raise CalibrationError if ``x`` holds NaN or Inf: a check of the data itself, so it reads it back."""
    # A finite sum implies finite elements; only a huge-but-finite tensor needs the elementwise check.
    if not (bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())):
        raise CalibrationError(f"non-finite values (NaN/Inf) reached {where}")


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

    def update(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add one batch; ``weight`` (broadcastable to ``x``, >= 0) scales each element's squared error."""
        x = x.detach().float()
        if x.numel() == 0:
            return
        require_finite(x, f"quantization point '{self.name}'")
        lower, upper = percentile_bounds(x, self.percentiles, self.channel_dim)
        errors = self._candidate_errors(x, lower, upper, None if weight is None else weight.detach().float())
        if self._error_sum is None:
            self._lower_sum, self._upper_sum, self._error_sum = lower, upper, errors
        else:
            self._lower_sum += lower
            self._upper_sum += upper
            self._error_sum += errors
        self.batches += 1

    def _candidate_errors(
        self, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, weight: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def _squared_errors(self, x: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """(Weighted) squared error of candidates stacked along dim 0 of ``x_hat``, which this consumes as scratch.

        The result must not depend on how many candidates share the stack, or a choice between nearly
        equal candidates could flip. A per-channel sum is a separate reduction per output either way,
        but one sum over a stack of whole tensors splits the work across threads differently from the
        sum of one tensor, so per tensor each candidate is reduced on its own.
        """
        diff = x_hat.sub_(x).square_()
        if weight is not None:
            diff.mul_(weight)
        if self.channel_dim is None:
            return torch.stack([candidate.sum() for candidate in diff])
        channels = diff.movedim(self.channel_dim % x.dim() + 1, -1)
        return channels.reshape(len(diff), -1, channels.shape[-1]).sum(1)

    def best_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean range of the least-error candidate (per channel when channel-wise)."""
        if self._error_sum is None:
            raise CalibrationError(f"quantization point '{self.name}' saw no calibration data")
        best = self._error_sum.argmin(dim=0, keepdim=True)
        lower = self._lower_sum.gather(0, best).squeeze(0) / self.batches
        upper = self._upper_sum.gather(0, best).squeeze(0) / self.batches
        return lower, upper


# Scratch for fake-quantizing several candidates at once (64 MiB of float32). Calibration on a loaded
# machine is bound by the number of parallel ops more than by their size, so small tensors evaluate
# every candidate in one set of ops; large ones go one candidate at a time to bound peak memory.
_SCRATCH_ELEMENTS = 1 << 24


def _candidate_view(t: torch.Tensor, ndim: int, channel_dim: int | None) -> torch.Tensor:
    """View per-candidate values (P,) or (P, C) as (P, 1, .., C, .., 1) against a tensor of rank ``ndim``."""
    shape = [1] * ndim
    if channel_dim is not None:
        shape[channel_dim] = t.shape[-1]
    return t.reshape(t.shape[0], *shape)


class UniformObserver(_CandidateObserver):
    """Chooses an asymmetric uniform range among percentile candidates, per tensor or per channel."""

    def _candidate_errors(
        self, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, weight: torch.Tensor | None
    ) -> torch.Tensor:
        scale, zero_point = uniform_qparams(lower, upper, self.bits)
        scale = _candidate_view(scale, x.dim(), self.channel_dim)
        zero_point = _candidate_view(zero_point, x.dim(), self.channel_dim)
        group = max(1, _SCRATCH_ELEMENTS // x.numel())
        buffer = x.new_empty((min(group, len(scale)), *x.shape))  # reused by every group: no allocation per grid
        errors = []
        for start in range(0, len(scale), group):
            s, z = scale[start : start + group], zero_point[start : start + group]
            errors.append(self._squared_errors(x, fake_quant_uniform(x, s, z, self.bits, out=buffer[: len(s)]), weight))
        return torch.cat(errors)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the chosen range."""
        lower, upper = self.best_bounds()
        return uniform_qparams(lower, upper, self.bits)


class LogSqrt2Observer(_CandidateObserver):
    """Chooses the log√2 scale (the largest representable value) among upper-percentile candidates."""

    def __init__(self, name: str, bits: int, percentiles: tuple[float, ...]) -> None:
        super().__init__(name, bits, percentiles, channel_dim=None)

    def _candidate_errors(
        self, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, weight: torch.Tensor | None
    ) -> torch.Tensor:
        scales = torch.clamp(upper, min=1e-8)
        return torch.cat(
            [self._squared_errors(x, fake_quant_log_sqrt2(x, s, self.bits).unsqueeze(0), weight) for s in scales]
        )

    def scale(self) -> torch.Tensor:
        _, upper = self.best_bounds()
        return torch.clamp(upper, min=1e-8)


class ChannelRange:
    """Running per-channel (last dim) minimum and maximum, for shifts that only need a channel's range."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._low: torch.Tensor | None = None
        self._high: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        low, high = x.detach().reshape(-1, x.shape[-1]).float().aminmax(dim=0)
        require_finite(torch.stack([low, high]), f"'{self.name}'")
        if self._low is None:
            self._low, self._high = low, high
        else:
            torch.minimum(self._low, low, out=self._low)
            torch.maximum(self._high, high, out=self._high)

    def midpoint(self) -> torch.Tensor:
        """The centre of every channel's range: the shift that makes the largest magnitude smallest."""
        if self._low is None:
            raise CalibrationError(f"'{self.name}' saw no calibration data")
        return (self._low + self._high) / 2
