"""ThiNet and He et al.'s channel selection, both on the same Gram matrix of unit contributions.

A block's attention output is ``Y = Σ_h X_h W_hᵀ`` (X_h: head h's merged channels, the input of proj;
W_h: proj's columns of those channels), its MLP output ``Y = Σ_c x_c w_cᵀ`` over hidden channels
(fc2's input and columns). Each unit's contribution ``Z_u = X_u W_uᵀ`` enters the residual stream
through LayerScale γ, so they are compared there: ``M[u, v] = ⟨γ ⊙ Z_u, γ ⊙ Z_v⟩`` over every token
of the calibration images. M is one pass of the images away (the consumer's input second moment
∘ its weights' Gram, summed within heads) and holds everything both methods need:

- ``thinet`` (Luo et al., ICCV 2017): greedily remove the unit whose removal adds the least to
  ‖Σ_{removed} Z_u‖² = Σ_{removed²} M, the error of the consumer's output; the score of a unit is
  that error (relative to ‖Y‖²) when it was removed, so units removed earlier score lower.
- ``regression`` (He et al., ICCV 2017): LASSO over unit coefficients β,
  min ½‖Y − Σ β_u Z_u‖² + λ‖β‖₁ = ½βᵀMβ − (M·1)ᵀβ + λ‖β‖₁ (+ const), λ raised until the wanted number
  of β is zero. Solved along a geometric λ path (accelerated proximal gradient, warm started); a unit's
  score is the largest λ on the path (relative to λ_max, where all β are zero) at which it is still in
  the model, ties broken by its |β| there, so removing the lowest k is raising λ until k are zero. Its
  least-squares step is ``lrpq.prune.recovery``'s refit, applied after every criterion.

Both rank units on the unpruned model (not block after block on the pruned one, as the papers do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lrpq.calibrate import observe_inputs
from lrpq.gptq import SecondMoment
from lrpq.prune.structure import branch_scale, prunable_blocks

LASSO_PATH_STEPS = 40
LASSO_PATH_END = 1e-3  # smallest λ of the path, relative to λ_max
LASSO_MAX_ITERATIONS = 500
LASSO_TOLERANCE = 1e-7


def consumers(model: nn.Module) -> dict[str, tuple[str, str, nn.Linear]]:
    """``"<block>:<kind>"`` → (block, kind, the Linear reading those units: proj for heads, fc2 for hidden)."""
    result = {}
    for name, block in prunable_blocks(model).items():
        result[f"{name}:heads"] = (name, "heads", block.attn.proj)
        result[f"{name}:hidden"] = (name, "hidden", block.mlp.fc2)
    return result


@torch.no_grad()
def contribution_grams(
    model: nn.Module, images: Tensor, *, batch_size: int = 8, progress: bool = True
) -> dict[str, dict[str, Tensor]]:
    """Per block and unit kind: the float64 Gram ``M`` of the units' contributions (module doc)."""
    readers = consumers(model)
    moments = {key: SecondMoment(linear.in_features) for key, (_, _, linear) in readers.items()}
    with observe_inputs({key: linear for key, (_, _, linear) in readers.items()}, moments):
        for batch in tqdm(images.split(batch_size), desc="unit grams", disable=not progress, leave=False):
            model(batch)
    blocks = prunable_blocks(model)
    grams: dict[str, dict[str, Tensor]] = {}
    for key, (name, kind, linear) in readers.items():
        gamma = branch_scale(blocks[name], "attn" if kind == "heads" else "mlp").double()
        weight = linear.weight.double() * gamma.unsqueeze(1)
        gram = moments.pop(key).matrix.mul_(weight.T @ weight)
        if kind == "heads":
            heads = blocks[name].attn.num_heads
            gram = gram.reshape(heads, gram.shape[0] // heads, heads, -1).sum((1, 3))
        grams.setdefault(name, {})[kind] = gram
    return grams


def strictly_increasing(order: Sequence[int], values: Sequence[float]) -> np.ndarray:
    """Scores of units ranked ``order`` (lowest first) from non-decreasing ``values``, ties lifted by an ulp each.

    Selection keeps the highest scores with ties going to the lower index; a tie here must instead
    follow the method's own order, so equal values are made strictly increasing along it.
    """
    scores = np.empty(len(order))
    previous = -math.inf
    for unit, value in zip(order, values, strict=True):
        previous = max(float(value), np.nextafter(previous, math.inf))
        scores[unit] = previous
    return scores


def thinet_scores(gram: Tensor) -> np.ndarray:
    """ThiNet's greedy removal order on contribution Gram ``gram``; score = relative error at removal."""
    count = gram.shape[0]
    total = float(gram.sum()) or 1.0
    diagonal, cross = gram.diagonal(), torch.zeros(count, dtype=gram.dtype)
    removed = torch.zeros(count, dtype=torch.bool)
    error, order, errors = 0.0, [], []
    for _ in range(count):
        increase = (diagonal + 2 * cross).masked_fill(removed, math.inf)
        unit = int(increase.argmin())
        error += float(increase[unit])
        removed[unit] = True
        cross += gram[:, unit]
        order.append(unit)
        errors.append(error / total)
    return strictly_increasing(order, np.maximum.accumulate(errors))


def _soft_threshold(x: Tensor, threshold: float) -> Tensor:
    return x.sign() * (x.abs() - threshold).clamp(min=0)


def lasso(gram: Tensor, target: Tensor, penalty: float, start: Tensor, lipschitz: float) -> Tensor:
    """argmin ½βᵀGβ − tᵀβ + penalty·‖β‖₁ by FISTA from ``start`` (G positive semi-definite, L its top eigenvalue)."""
    beta, momentum, step = start.clone(), start.clone(), 1.0
    for _ in range(LASSO_MAX_ITERATIONS):
        following = _soft_threshold(momentum - (gram @ momentum - target) / lipschitz, penalty / lipschitz)
        next_step = (1 + math.sqrt(1 + 4 * step * step)) / 2
        momentum = following + (step - 1) / next_step * (following - beta)
        converged = float((following - beta).abs().max()) <= LASSO_TOLERANCE
        beta, step = following, next_step
        if converged:
            break
    return beta


def regression_scores(gram: Tensor) -> np.ndarray:
    """He et al.'s LASSO selection on contribution Gram ``gram``; score = relative λ at which a unit leaves."""
    count = gram.shape[0]
    target = gram.sum(1)  # ⟨Z_u, Y⟩ with Y = Σ_v Z_v
    lambda_max = float(target.abs().max())
    if lambda_max == 0.0:  # no unit contributes anything: nothing to choose between
        return np.zeros(count)
    lipschitz = float(torch.linalg.eigvalsh(gram)[-1])
    entered, strength = np.zeros(count), np.zeros(count)
    beta = torch.zeros(count, dtype=gram.dtype)
    for relative in np.geomspace(1.0, LASSO_PATH_END, LASSO_PATH_STEPS)[1:]:
        beta = lasso(gram, target, relative * lambda_max, beta, lipschitz)
        new = (beta != 0).numpy() & (entered == 0)
        entered[new], strength[new] = relative, beta.abs().numpy()[new]
    never = entered == 0  # still zero at the end of the path: ranked by how close they are to entering
    strength[never] = (target - gram @ beta).abs().numpy()[never] / (LASSO_PATH_END * lambda_max)
    order = np.lexsort((strength, entered))
    return strictly_increasing(order, entered[order])
