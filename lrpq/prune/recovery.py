"""Label-free recovery after pruning: refit each consumer (proj, fc2) so the block's output is reconstructed.

ThiNet and He et al. follow channel removal with a least-squares fit of the next layer. Here every
consumer of pruned units is refit, block by block in forward order, so that on the calibration
images its output from the *pruned* model's input matches the *unpruned* model's output:

    min_{W', b'} Σ_tokens ‖x_p W'ᵀ + b' − (x_o Wᵀ + b)‖² + λ‖[W', b'] − [W_p, b]‖²

x_p is what the consumer reads in the pruned model (its kept units, after every earlier block was
pruned and refit), x_o, W and b the unpruned model's, and W_p the consumer as pruning left it (the
pruned units' columns dropped). 32 images are a few thousand tokens for up to ~1,500 inputs: a
plain fit reproduces the calibration outputs and generalises worse than no refit at all (ref-A, 25 %
of heads and 30 % of channels removed globally by L1: 64.8 % top-1 unrefit, 63.2 % refit with a
10⁻⁶ ridge towards zero, 67.1 % with a 0.1 ridge towards W_p, on 1,000 dev images). So the fit is
pulled towards W_p, and λ (relative to the mean diagonal of the normal equations) is chosen per
consumer from ``RIDGES`` by 4-fold cross-validation over the calibration images: no labels and no
evaluation images are used. Since W_p is feasible and pays no penalty, the refit never raises the
calibration error. The normal equations are accumulated in float64 over [x_p, 1] (the ones only
where the layer has a bias). Consumers before the first pruned unit see exactly the unpruned inputs
and are left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lrpq.errors import LrpqError
from lrpq.prune.reconstruction import consumers
from lrpq.prune.structure import PrunedStructure

RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)  # λ / mean diagonal, searched by CV
FOLDS = 4


class RecoveryError(LrpqError):
    """Recovery asked for without enough calibration images to choose its ridge."""


@dataclass(frozen=True)
class Refit:
    """One consumer's calibration error relative to its target's energy, before and after the refit.

    Before is the consumer as pruning left it (the pruned units' columns dropped, weights unchanged).
    """

    layer: str
    before: float
    after: float
    ridge: float

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Reached(Exception):
    """Raised from a hook once the layer of interest has run: the rest of the forward pass is not needed."""


def _layer_io(model: nn.Module, layer: nn.Module, batch: Tensor) -> tuple[Tensor, Tensor]:
    """``layer``'s input and output when ``model`` runs ``batch``, stopping the pass right after it."""
    seen: list[Tensor] = []

    def stop(_module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        seen.extend((args[0], output))
        raise _Reached

    handle = layer.register_forward_hook(stop)
    try:
        model(batch)
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0], seen[1]


def _augmented(x: Tensor, bias: bool) -> Tensor:
    """Rows = tokens, float64, with a column of ones when the layer has a bias to fit."""
    rows = x.reshape(-1, x.shape[-1]).double()
    return torch.cat([rows, rows.new_ones(len(rows), 1)], 1) if bias else rows


def _stacked(linear: nn.Linear) -> Tensor:
    """[Wᵀ; bᵀ]: the layer as the coefficients of its augmented input."""
    weight = linear.weight.detach().double().T
    return torch.cat([weight, linear.bias.detach().double().unsqueeze(0)]) if linear.bias is not None else weight


@dataclass
class NormalEquations:
    """Σ xᵀx, Σ xᵀy and Σ‖y‖² of one set of tokens (x augmented, y the target), in float64."""

    gram: Tensor
    cross: Tensor
    energy: float = 0.0

    @classmethod
    def zeros(cls, inputs: int, outputs: int) -> NormalEquations:
        return cls(torch.zeros(inputs, inputs, dtype=torch.float64), torch.zeros(inputs, outputs, dtype=torch.float64))

    def add(self, x: Tensor, y: Tensor) -> None:
        self.gram.addmm_(x.T, x)
        self.cross.addmm_(x.T, y)
        self.energy += float(y.square().sum())

    def __add__(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(self.gram + other.gram, self.cross + other.cross, self.energy + other.energy)

    def __sub__(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(self.gram - other.gram, self.cross - other.cross, self.energy - other.energy)

    def error(self, coefficients: Tensor) -> float:
        """Σ‖x C − y‖² over these tokens."""
        fit = float((coefficients * self.cross).sum())
        return self.energy - 2 * fit + float((coefficients * (self.gram @ coefficients)).sum())

    def solve(self, prior: Tensor, ridge: float) -> Tensor:
        """argmin_C Σ‖x C − y‖² + λ‖C − prior‖², λ = ridge · mean diagonal."""
        damping = ridge * float(self.gram.diagonal().mean().clamp(min=1e-12))
        damped = self.gram + damping * torch.eye(len(self.gram), dtype=self.gram.dtype)
        return torch.linalg.solve(damped, self.cross + damping * prior)


def cross_validated_ridge(folds: list[NormalEquations], prior: Tensor) -> float:
    """The ridge of ``RIDGES`` whose fits on all folds but one predict the held-out fold best, summed over folds."""
    total = sum(folds[1:], folds[0])
    held_out = {ridge: sum(fold.error((total - fold).solve(prior, ridge)) for fold in folds) for ridge in RIDGES}
    return min(RIDGES, key=held_out.__getitem__)


def _consumers_to_refit(model: nn.Module, structure: PrunedStructure) -> Iterator[tuple[str, nn.Linear]]:
    """Consumers in forward order from the first one whose input lost units."""
    started = False
    for key, (name, kind, linear) in consumers(model).items():
        started = started or structure.blocks[name].removed(kind) > 0
        if started:
            yield key, linear


@torch.no_grad()
def refit_consumers(
    pruned: nn.Module,
    original: nn.Module,
    structure: PrunedStructure,
    images: Tensor,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> list[Refit]:
    """Refit every consumer of ``pruned`` (``structure`` applied to ``original``) in place; see module doc."""
    if images.shape[0] < 2:
        raise RecoveryError("recovery cross-validates its refit over the calibration images: it needs at least 2")
    folds = [images[start :: min(FOLDS, images.shape[0])] for start in range(min(FOLDS, images.shape[0]))]
    targets = {key: linear for key, (_, _, linear) in consumers(original).items()}
    todo = list(_consumers_to_refit(pruned, structure))
    reports = []
    for key, linear in tqdm(todo, desc="refit", disable=not progress, leave=False):
        bias = linear.bias is not None
        equations = [NormalEquations.zeros(linear.in_features + bias, linear.out_features) for _ in folds]
        for fold, fold_images in zip(equations, folds, strict=True):
            for batch in fold_images.split(batch_size):
                x = _augmented(_layer_io(pruned, linear, batch)[0], bias)
                fold.add(x, _layer_io(original, targets[key], batch)[1].reshape(len(x), -1).double())
        prior = _stacked(linear)
        ridge = cross_validated_ridge(equations, prior)
        total = sum(equations[1:], equations[0])
        coefficients = total.solve(prior, ridge)
        linear.weight.copy_(coefficients[: linear.in_features].T)
        if bias:
            linear.bias.copy_(coefficients[-1])
        scale = total.energy or 1.0
        reports.append(Refit(key, total.error(prior) / scale, total.error(coefficients) / scale, ridge))
    return reports
