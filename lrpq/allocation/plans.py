"""``--mixed``: from a float model and calibration images to a bit plan, by one allocator under one budget.

Allocators (``ALLOCATORS``):

* ``paper`` — LRP-QViT's rule on relevance alone: the first two blocks one bit up, as many of the
  least relevant layers one bit down (layer budget only);
* ``exact`` — relevance alone, solved exactly: each layer's noise modelled as ``r_l · 4^-b`` (its
  relevance share times a b-bit quantizer's noise power);
* ``sensitivity`` — each layer's measured logit noise at every width (``noise_estimate``, or the
  slow one-layer-at-a-time ``noise_measurement`` with ``noise_method="exact"``);
* ``relevance`` — the measured noise weighted by relevance: a layer's noise counts
  ``(I_l / Ī)^γ`` times, ``I_l`` its share of its block's LRP-QViT relevance (``Ī`` their mean), so
  noise on the layers the prediction rests on costs more (after Mix-QViT, which combines the two
  criteria; ``γ = 0`` is ``sensitivity``).

Relevance plans cover the transformer blocks (the patch embedding and head keep the target widths,
as in LRP-QViT); measured plans cover every quantized layer (an input the config pins, the image
into the patch embedding, keeps its width). Budgets are in ``lrpq.allocation.budget``; every one is
what the fixed-bit plan at the target costs on the planned layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lrpq.allocation.budget import BUDGETS, LayerCost, PlanCost, layer_costs, plan_cost, target_cost
from lrpq.allocation.from_relevance import allocatable, plan_from_scores, widths_for
from lrpq.allocation.noise_estimate import estimate_layer_noise
from lrpq.allocation.noise_measurement import DEFAULT_NOISE_IMAGES, LayerNoise, measure_layer_noise
from lrpq.allocation.solvers import AllocationError, Option, least_noise, noise_allocation, placeholder_wbits
from lrpq.config import BitPlan, LayerBits, QuantConfig
from lrpq.relevance import LayerScores, compute_layer_scores

ALLOCATORS = ("paper", "exact", "sensitivity", "relevance")
DEFAULT_ALLOCATOR = "sensitivity"  # measured best on dev (docs/findings.md, issue 24)
NOISE_METHODS = ("estimate", "exact")
DEFAULT_RELEVANCE_WEIGHT = 0.25  # γ of the relevance allocator, by measurement (docs/findings.md)
RELEVANCE_SCALES = ("block", "kind")  # what a layer's relevance is compared with (``relevance_weights``)
DEFAULT_RELEVANCE_SCALE = "block"
# Weight widths of measured plans go no lower than this (nor above the target), by measurement: 2-bit
# weights lost 9.6 points on ref-B W3A4 (docs/findings.md). None: the widths' lowest.
DEFAULT_MIN_WBITS: int | None = 3
RELEVANCE_ALLOCATORS = ("paper", "exact", "relevance")
NOISE_ALLOCATORS = ("sensitivity", "relevance")
Curves = Mapping[str, Mapping[int, float]]


@dataclass
class MixedPlan:
    """A plan, what it costs against the fixed plan it replaces, and what it was made from."""

    plan: BitPlan
    cost: PlanCost
    fixed_cost: PlanCost
    allocator: str
    budget: str
    scores: LayerScores | None = None
    noise: LayerNoise | None = None


def default_budget(allocator: str) -> str:
    """The paper rule moves whole bits between layers, so it has only the layer budget; the rest spend BOPs."""
    return "layers" if allocator == "paper" else "bops"


def check_request(allocator: str, budget: str, wbits: float, abits: float) -> None:
    """Refuse, before any work, an allocator, budget or target that cannot go together."""
    if allocator not in ALLOCATORS:
        raise AllocationError(f"allocator {allocator!r} is unknown; use one of: {', '.join(ALLOCATORS)}")
    if budget not in BUDGETS:
        raise AllocationError(f"budget {budget!r} is unknown; use one of: {', '.join(BUDGETS)}")
    if allocator == "paper" and budget != "layers":
        raise AllocationError(
            f"the paper rule moves whole bits between layers, so it counts the layer budget only, not {budget!r}; "
            "use another allocator for a size or BOPs budget"
        )
    fractional = [bits for bits in (wbits, abits) if not float(bits).is_integer()]
    if allocator == "paper" and fractional:
        raise AllocationError(
            f"{fractional[0]} bits is a mean the paper rule cannot reach; use another allocator for a fractional mean"
        )


def _limit(total: float) -> int:
    """The largest integer cost within ``total`` (a product of floats that lands on an integer counts as it)."""
    nearest = round(total)
    return nearest if abs(total - nearest) <= 1e-9 * max(1.0, abs(total)) else math.floor(total)


def weight_widths(curves: Curves, target: float, budget: str, costs: Mapping[str, LayerCost]) -> dict[str, int]:
    """Weight widths: the exact layer mean, or at most the fixed plan's parameter-weighted bits (size, bops)."""
    if budget == "layers":
        return noise_allocation(curves, target)
    options = {
        name: [Option(b, curve[b], costs[name].params * b) for b in sorted(curve)] for name, curve in curves.items()
    }
    return least_noise(options, _limit(target * sum(costs[name].params for name in curves)))


def input_widths(
    curves: Curves,
    targets: tuple[float, float],
    budget: str,
    costs: Mapping[str, LayerCost],
    wbits: Mapping[str, int],
    pinned: Mapping[str, int],
) -> dict[str, int]:
    """Input widths: the exact layer mean, or (bops) at most the fixed plan's BOPs given the weight widths.

    ``wbits`` are the chosen weight widths (a matmul reads two activations, so its cost is MACs · a²);
    ``pinned`` inputs keep their width and their BOPs come out of the budget first.
    """
    if budget != "bops":
        return noise_allocation(curves, targets[1])
    fixed = target_cost({name: costs[name] for name in [*curves, *pinned]}, targets, pinned).bops

    def bops(name: str, abits: int) -> int:
        return costs[name].bops(wbits.get(name, 0), abits, weightless=costs[name].params == 0)

    held = sum(bops(name, bits) for name, bits in pinned.items())
    options = {
        name: [Option(b, noise, bops(name, b)) for b, noise in sorted(curve.items())] for name, curve in curves.items()
    }
    return least_noise(options, _limit(fixed - held))


def plan_widths(
    weight_curves: Curves,
    input_curves: Curves,
    targets: tuple[float, float],
    budget: str,
    costs: Mapping[str, LayerCost],
    pinned: Mapping[str, int],
) -> BitPlan:
    """Widths of every layer in ``input_curves`` (and ``pinned``) with the least summed noise within ``budget``."""
    weights = weight_widths(weight_curves, targets[0], budget, costs)
    inputs = input_widths(input_curves, targets, budget, costs, weights, pinned) | dict(pinned)
    unused = placeholder_wbits(targets[0])
    names = [name for name in costs if name in inputs]
    return BitPlan({name: LayerBits(weights.get(name, unused), inputs[name]) for name in names})


def weight_floor(wbits: float, widths: tuple[int, int], min_wbits: int | None) -> int:
    """The narrowest weight width a plan may give: the higher of ``min_wbits`` and the widths' lowest, never
    above the target. A floor under the widths is already met (so the default floor never clashes with a
    user's ``--widths``); one over them cannot be."""
    if min_wbits is None:
        return widths[0]
    if min_wbits > widths[1]:
        raise AllocationError(
            f"min_wbits={min_wbits} is above the widths {widths[0]}–{widths[1]}; use at most {widths[1]}"
        )
    return min(max(min_wbits, widths[0]), math.floor(wbits))


def at_least(curves: Curves, lowest: int) -> dict[str, dict[int, float]]:
    """``curves`` without the widths below ``lowest``."""
    return {name: {b: v for b, v in curve.items() if b >= lowest} for name, curve in curves.items()}


def layer_kind(name: str) -> str:
    """What a layer is within its block (``attn.qkv``, ``mlp.fc1``, ``downsample.reduction``): its last two names."""
    return ".".join(name.split(".")[-2:])


def relevance_weights(
    scores: LayerScores, names: list[str], gamma: float, scale: str = DEFAULT_RELEVANCE_SCALE
) -> dict[str, float]:
    """``(I_l / Ī)^γ`` per layer; 1 outside the blocks.

    ``scale="block"``: ``I_l`` is the layer's share of its block and ``Ī`` the mean share (LRP-QViT's
    normalisation), so layers of different kinds are compared with each other. ``scale="kind"``: ``I_l``
    is the layer's score and ``Ī`` the mean over the layers of its kind in every block, so a qkv is
    compared only with the other qkv's: relevance then says which blocks the prediction rests on, and
    the measured noise alone how each kind of layer suffers from fewer bits. A mean over a layer's output
    elements differs by orders of magnitude between kinds (an attention map against a hidden vector),
    which the block shares carry into the weights.
    """
    if scale not in RELEVANCE_SCALES:
        raise AllocationError(f"relevance scale {scale!r} is unknown; use one of: {', '.join(RELEVANCE_SCALES)}")
    kept = allocatable(scores)
    if scale == "block":
        relative = kept.relative()
        mean = sum(relative.values()) / len(relative)
        return {name: (relative[name] / mean) ** gamma if name in relative else 1.0 for name in names}
    kinds: dict[str, list[float]] = {}
    for name, score in kept.scores.items():
        kinds.setdefault(layer_kind(name), []).append(score)
    means = {kind: sum(values) / len(values) for kind, values in kinds.items()}
    weights = {}
    for name in names:
        mean = means.get(layer_kind(name), 0.0) if name in kept.scores else 0.0
        weights[name] = (kept.scores[name] / mean) ** gamma if mean > 0 else 1.0
    return weights


def mixed_plan(
    model: nn.Module,
    config: QuantConfig,
    calib: torch.Tensor,
    *,
    allocator: str,
    budget: str | None = None,
    wbits: float | None = None,
    abits: float | None = None,
    widths: tuple[int, int] | None = None,
    relevance_images: torch.Tensor | None = None,
    scores: LayerScores | None = None,
    noise: LayerNoise | None = None,
    noise_images: int = DEFAULT_NOISE_IMAGES,
    noise_method: str = "estimate",
    relevance_weight: float = DEFAULT_RELEVANCE_WEIGHT,
    relevance_scale: str = DEFAULT_RELEVANCE_SCALE,
    min_wbits: int | None = DEFAULT_MIN_WBITS,
    progress: bool = True,
) -> MixedPlan:
    """A mixed plan for the float ``model`` at mean widths ``wbits``/``abits`` (default: ``config``'s).

    ``relevance_images`` (default: ``calib``) are explained for the relevance allocators unless
    ``scores`` are given; the noise allocators estimate (or measure) on the first ``noise_images``
    calibration images unless ``noise`` is given (e.g. shared by plans at several targets).
    ``min_wbits`` is the narrowest weight width the ``exact`` and measured plans may give (activations
    keep every width in ``widths``); ``None``: ``widths``' lowest.
    """
    targets = (config.wbits if wbits is None else wbits, config.abits if abits is None else abits)
    budget = budget or default_budget(allocator)
    check_request(allocator, budget, *targets)
    if noise_method not in NOISE_METHODS:
        raise AllocationError(f"noise_method {noise_method!r} is unknown; use one of: {', '.join(NOISE_METHODS)}")
    widths = widths_for(*targets, widths)
    lowest_wbits = weight_floor(targets[0], widths, min_wbits)
    costs = layer_costs(model, tuple(calib.shape[1:]))
    if allocator in RELEVANCE_ALLOCATORS and scores is None:
        scores = compute_layer_scores(model, calib if relevance_images is None else relevance_images, progress=progress)
    if allocator in NOISE_ALLOCATORS and noise is None:
        measure = estimate_layer_noise if noise_method == "estimate" else measure_layer_noise
        noise = measure(model, config, calib, widths, images=min(noise_images, calib.shape[0]), progress=progress)
    if allocator not in NOISE_ALLOCATORS:
        noise = None
    if allocator == "paper":
        plan = plan_from_scores(model, scores, wbits=targets[0], abits=targets[1], allocator="paper", widths=widths)
        pinned: dict[str, int] = {}
    elif allocator == "exact":
        relative = allocatable(scores).relative()
        curves = {name: {b: r * 4.0**-b for b in range(widths[0], widths[1] + 1)} for name, r in relative.items()}
        weighted = {name: curve for name, curve in curves.items() if costs.get(name, LayerCost(0, 0)).params > 0}
        weighted = at_least(weighted, lowest_wbits)
        pinned = {}
        plan = plan_widths(weighted, curves, targets, budget, costs, pinned)
    else:
        weighted, inputs, pinned = (
            at_least(noise.curves("weight"), lowest_wbits),
            noise.curves("inputs"),
            noise.pinned_abits,
        )
        if allocator == "relevance":
            factor = relevance_weights(scores, list(noise.noise), relevance_weight, relevance_scale)
            weighted = {name: {b: v * factor[name] for b, v in curve.items()} for name, curve in weighted.items()}
            inputs = {name: {b: v * factor[name] for b, v in curve.items()} for name, curve in inputs.items()}
        plan = plan_widths(weighted, inputs, targets, budget, costs, pinned)
    planned = {name: costs[name] for name in plan.layers}
    fixed = target_cost(planned, targets, pinned)
    return MixedPlan(plan, plan_cost(plan, planned), fixed, allocator, budget, scores, noise)
