"""GPTQ weight rounding (Frantar et al., ICLR 2023): round a Linear's weights so its *output* error is small.

Rounding every weight to the nearest grid point minimises the weight error, not the error of
``x Wᵀ`` on real inputs. GPTQ rounds one input column at a time and moves that column's rounding
error onto the columns not yet rounded, weighted by the inverse of the inputs' second-moment matrix
``H = Xᵀ X``, which is the optimal update for the layer's squared output error (Optimal Brain
Surgeon on a quadratic). The grid itself — per-output-channel scale and zero point, calibrated on
the unrounded weight, or with ``weight_range_metric='inputs'`` chosen from the same ``XᵀX`` just
before the sweep (``input_weighted_range``) — is not moved by it, so a rounded weight is one the
weight quantizer reproduces.

On folded layers this matters most: a channel fold multiplies weight columns by up to ``max r``,
and GPTQ spends the rounding error where the inputs are small.

Precision and cost: ``H`` is summed in float64 (a float32 product per batch, so the large product
runs at float32 speed), and its damped inverse Cholesky factor is taken in float64, where a
conditioning problem would show. The column sweep, a loop of thousands of small steps per layer, runs
in float32 on the transposed weight, so that a column is a contiguous row and each step is five
tensor operations: the rounding itself is float32 arithmetic in the weight quantizer anyway
(``tests/test_gptq.py`` holds it against the float64 sweep).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

from lrpq.errors import LrpqError
from lrpq.primitives import fake_quant_uniform, uniform_qparams

# Diagonal damping as a fraction of the mean input power, GPTQ's default: it keeps H invertible for
# dead or collinear channels without changing the solution where H is well conditioned.
DAMPING = 0.01
# Columns rounded one by one before their accumulated error reaches the later columns in one
# product: small enough that the one-by-one updates stay cheap, large enough for that product.
BLOCK_COLUMNS = 32
# Shrinks of a row's min-max range that ``input_weighted_range`` compares: 1, 0.975, … 0.5. At 3 bits
# the least-error grids of ref-B's rows sit well inside their extremes (docs/findings.md).
RANGE_SHRINKS = tuple(1.0 - i / 40 for i in range(21))


class SecondMoment:
    """Running ``Xᵀ X`` of a layer's inputs (rows = tokens, last dim = input features), float64 on their device."""

    def __init__(self, features: int, device: torch.device | str | None = None) -> None:
        self.matrix = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # half precision would overflow
        self.matrix.add_(rows.T @ rows)  # one batch in (at least) float32, summed across batches in float64
        self.rows += len(rows)


class WeightGrid(Protocol):
    """What GPTQ reads of a weight quantizer (``lrpq.quantizers.WeightQuantizer``)."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int

    def rounding_offsets(self, weight: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor: ...

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None: ...


class StreamingRounding:
    """GPTQ of one layer within the calibration pass: ``XᵀX`` of its inputs, rounded once the last batch passed.

    Holding every layer's matrix until the pass ends costs 12·(3·384² + 1536²)·8 B ≈ 270 MB on deit_s,
    more than the pass itself needs. A layer's matrix is complete once the last of ``batches`` has
    passed it, so the layer is rounded there and the matrix freed: with one calibration batch (the
    default) a single matrix is alive at a time. The weight keeps its nearest rounding until the
    caller applies ``finish()``'s offsets after the pass, so every later layer is calibrated exactly as
    if all were rounded at the end. The layer must run once per batch, as every Linear of the
    supported models does; a second call is refused rather than left out of a rounding already done.
    With ``choose_range`` the grid itself is chosen there too (``input_weighted_range``), from the same
    ``XᵀX``, and set on ``grid`` before the rounding.
    """

    def __init__(
        self, name: str, weight: torch.Tensor, grid: WeightGrid, batches: int, choose_range: bool = False
    ) -> None:
        self.name, self.weight, self.grid, self.batches = name, weight, grid, batches
        self.choose_range = choose_range
        self.moment: SecondMoment | None = None  # allocated on the first input, on its device
        self.offsets: torch.Tensor | None = None
        self.calls = 0

    def update(self, x: torch.Tensor) -> None:
        if self.offsets is not None:
            raise LrpqError(
                f"GPTQ: layer '{self.name}' ran more than once per calibration batch, after its rounding; "
                "quantize with gptq=False (--no-gptq, which also needs the default weight ranges)"
            )
        if self.moment is None:
            self.moment = SecondMoment(x.shape[-1], x.device)
        self.moment.update(x)
        self.calls += 1
        if self.calls == self.batches:
            self.finish()

    def finish(self) -> torch.Tensor | None:
        """The layer's GPTQ rounding offsets (rounding now if a batch never reached it); None if none did."""
        if self.offsets is None and self.moment is not None:
            grid = self.grid
            if self.choose_range:
                grid.set_qparams(*input_weighted_range(self.weight, self.moment.matrix, grid.bits))
            rounded = _round_consuming(self.weight, self._take_matrix(), grid.scale, grid.zero_point, grid.bits)
            self.offsets = grid.rounding_offsets(self.weight, rounded)
        return self.offsets

    def _take_matrix(self) -> torch.Tensor:
        """The summed ``XᵀX``, no longer held here: the rounding frees it once factorised."""
        matrix, self.moment = self.moment.matrix, None
        return matrix


@torch.no_grad()
def input_weighted_range(
    weight: torch.Tensor, second_moment: torch.Tensor, bits: int, shrinks: tuple[float, ...] = RANGE_SHRINKS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row, the scale and zero point (shape (out, 1)) of the shrunk min-max range of least output error.

    A weight's own squared error treats every column alike, but the layer's output error of a row's
    rounding error ``e`` is ``e·XᵀX·eᵀ``: clipping a column whose inputs are small costs little, and
    the finer grid it buys serves every column. Each shrink of ``[min, max]`` is scored by that error
    under nearest rounding, the rounding GPTQ starts from; ties keep the wider range.
    """
    rows = weight.detach().float().reshape(len(weight), -1)
    h = second_moment.to(torch.float32)
    low, high = rows.min(1).values, rows.max(1).values
    best_error = torch.full_like(low, math.inf)
    best_scale, best_zero = torch.empty_like(low), torch.empty_like(low)
    for shrink in shrinks:
        scale, zero_point = uniform_qparams(low * shrink, high * shrink, bits)
        error = fake_quant_uniform(rows, scale[:, None], zero_point[:, None], bits) - rows
        output_error = (error @ h).mul_(error).sum(1)
        better = output_error < best_error
        best_error = torch.where(better, output_error, best_error)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero_point, best_zero)
    return best_scale[:, None], best_zero[:, None]


def inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``UᵀU``), in ``h``'s dtype; damps ``h`` in place.

    With ``J`` the order-reversing permutation and ``J H J = L Lᵀ``, ``U = J L⁻¹ J``: one Cholesky
    factorisation and one triangular inverse, instead of inverting ``H`` and factorising the inverse.
    """
    _damp(h)
    return _flipped_inverse(torch.linalg.cholesky(h.flip(0, 1)))


def _damp(h: torch.Tensor) -> None:
    h.diagonal().add_(DAMPING * h.diagonal().mean().clamp(min=1e-12))


def _flipped_inverse(lower: torch.Tensor) -> torch.Tensor:
    """``J L⁻¹ J``, solved in place on the identity: two ``n × n`` matrices alive at once."""
    identity = torch.eye(len(lower), dtype=lower.dtype, device=lower.device)
    return torch.linalg.solve_triangular(lower, identity, upper=False, out=identity).flip(0, 1)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread: the sweep's steps are too small to share.

    Each step touches one row of the weight, or a few dozen; split over two threads, every step
    waits for the slower one, which on a machine shared with other jobs made the sweep 10–30 times
    slower (measured on deit_s's layers: 0.4–1.1 s per layer against 0.02–0.07 s on one thread).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor, second_moment: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """Weights on the grid ``(scale, zero_point)`` (per output row, shape (out, 1)) chosen by GPTQ.

    Columns are taken in blocks: within a block each column is rounded and its error spread over the
    block's later columns; the block's accumulated error then updates all later columns in one product.
    Input channels that never fired (zero diagonal) carry no output error, so they are rounded as is.
    """
    return _round_consuming(weight, second_moment.to(torch.float64, copy=True), scale, zero_point, bits)


def _round_consuming(
    weight: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """``gptq_round`` on a float64 ``h`` that it may overwrite, and drops as soon as it is factorised."""
    h.diagonal().masked_fill_(h.diagonal() == 0, 1.0)  # dead channels
    _damp(h)
    # inverse_cholesky(h), dropping each matrix once the next is made: the flipped copy replaces h, the
    # factor replaces the copy, so no more than two n × n float64 matrices are alive (fc2's: 19 MB each).
    h = h.flip(0, 1)
    lower = torch.linalg.cholesky(h)
    del h
    u = _flipped_inverse(lower)
    del lower
    # Row i over its diagonal: column i's raw error (w - q) times row i is GPTQ's update of later columns.
    steps = u.div_(u.diagonal().clone().unsqueeze(1)).float()
    del u
    work = weight.detach().float().T.contiguous()  # (in, out): input column i is the contiguous row i
    scale, zero_point = scale.float().reshape(-1), zero_point.float().reshape(-1)
    with _one_thread():
        codes = _sweep(work, steps, scale, zero_point, 2**bits - 1)
    return codes.mul_(scale).T.to(weight.dtype)


def _sweep(
    work: torch.Tensor, steps: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, levels: int
) -> torch.Tensor:
    """GPTQ's column loop on ``work`` (in, out), which it consumes; codes less their zero point, per row.

    Codes are those of ``fake_quant_uniform``: ``clamp(round(w · (1 / s)), -z, levels - z)``.
    """
    inverse_scale, low, high = scale.reciprocal(), -zero_point, levels - zero_point
    codes, errors = torch.empty_like(work), torch.empty_like(work)
    columns = len(work)
    for start in range(0, columns, BLOCK_COLUMNS):
        stop = min(start + BLOCK_COLUMNS, columns)
        for i in range(start, stop):
            code = torch.mul(work[i], inverse_scale, out=codes[i]).round_().clamp_(low, high)
            error = torch.addcmul(work[i], code, scale, value=-1.0, out=errors[i])
            work[i + 1 : stop].addr_(steps[i, i + 1 : stop], error, alpha=-1.0)
        work[stop:].addmm_(steps[start:stop, stop:].T, errors[start:stop], alpha=-1.0)
    return codes
