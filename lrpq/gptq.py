"""GPTQ weight rounding (Frantar et al., ICLR 2023): round a Linear's weights so its *output* error is small.

Rounding every weight to the nearest grid point minimises the weight error, not the error of
``x Wᵀ`` on real inputs. GPTQ rounds one input column at a time and moves that column's rounding
error onto the columns not yet rounded, weighted by the inverse of the inputs' second-moment matrix
``H = Xᵀ X``, which is the optimal update for the layer's squared output error (Optimal Brain
Surgeon on a quadratic). The grid itself — per-output-channel scale and zero point, calibrated on
the unrounded weight — is unchanged, so a rounded weight is one the weight quantizer reproduces.

On folded layers this matters most: a channel fold multiplies weight columns by up to ``max r``,
and GPTQ spends the rounding error where the inputs are small.
"""

from __future__ import annotations

import torch

from lrpq.primitives import fake_quant_uniform

# Diagonal damping as a fraction of the mean input power, GPTQ's default: it keeps H invertible for
# dead or collinear channels without changing the solution where H is well conditioned.
DAMPING = 0.01
BLOCK_COLUMNS = 128


class SecondMoment:
    """Running ``Xᵀ X`` of a layer's inputs (rows = tokens, last dim = input features)."""

    def __init__(self, features: int) -> None:
        self.matrix = torch.zeros(features, features, dtype=torch.float64)
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).double()
        self.matrix.addmm_(rows.T, rows)
        self.rows += len(rows)


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``: the rows GPTQ reads its error updates from (damps ``h`` in place)."""
    h.diagonal().add_(DAMPING * h.diagonal().mean().clamp(min=1e-12))
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor, second_moment: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """Weights on the grid ``(scale, zero_point)`` (per output row, shape (out, 1)) chosen by GPTQ.

    Columns are taken in blocks: within a block each column is rounded and its error spread over the
    block's later columns; the block's accumulated error then updates all later columns in one product.
    Input channels that never fired (zero diagonal) carry no output error, so they are rounded as is.
    """
    work = weight.detach().double().clone()
    h = second_moment.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    u = _inverse_cholesky(h)
    scale, zero_point = scale.double(), zero_point.double()
    rounded = torch.empty_like(work)
    columns = work.shape[1]
    for start in range(0, columns, BLOCK_COLUMNS):
        stop = min(start + BLOCK_COLUMNS, columns)
        block, u_block = work[:, start:stop], u[start:stop, start:stop]
        errors = torch.empty_like(block)
        for i in range(stop - start):
            column = block[:, i : i + 1]
            quantized = fake_quant_uniform(column, scale, zero_point, bits)
            rounded[:, start + i : start + i + 1] = quantized
            error = (column - quantized) / u_block[i, i]
            block[:, i:].sub_(error * u_block[i : i + 1, i:])
            errors[:, i : i + 1] = error
        work[:, stop:].sub_(errors @ u[start:stop, stop:])
    return rounded.to(weight.dtype)
