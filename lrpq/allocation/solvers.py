"""Turn per-layer relevance into per-layer bit widths under a mean-bits budget (LRP-QViT).

Three allocators share one contract — integer widths within ``widths`` whose unweighted mean is the
target: ``paper`` reproduces the published rule and ``exact`` solves the budgeted problem optimally for
a stated noise model, both from relevance (behind ``make_bit_plan``); ``noise_allocation`` solves it
for noise measured per layer and width instead (``lrpq.allocation.noise_measurement``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lrpq.config import MAX_PRIMITIVE_BITS, MIN_PRIMITIVE_BITS, BitPlan, LayerBits
from lrpq.errors import LrpqError

ALLOCATORS = ("paper", "exact")
# Budgets within this of an integer count as that integer, so 3.3 * 10 layers is 33 bits, not 32.
_BUDGET_TOLERANCE = 1e-9


class AllocationError(LrpqError):
    """Scores, block structure, target or widths for which no bit allocation exists."""


def check_widths(widths: tuple[int, int]) -> tuple[int, int]:
    """Return ``(lo, hi)`` if every width between them is one a LayerBits can hold."""
    ok = (
        isinstance(widths, tuple)
        and len(widths) == 2
        and all(isinstance(w, int) and not isinstance(w, bool) for w in widths)
        and MIN_PRIMITIVE_BITS <= widths[0] <= widths[1] <= MAX_PRIMITIVE_BITS
    )
    if not ok:
        raise AllocationError(
            f"widths={widths!r} is not a valid range; use a tuple (lo, hi) of integers with "
            f"{MIN_PRIMITIVE_BITS} <= lo <= hi <= {MAX_PRIMITIVE_BITS}"
        )
    return widths


def _check_mean_target(target: float, lo: int, hi: int) -> None:
    """A mean-bits target the budgeted solvers can meet: a finite real number within the widths."""
    if (
        isinstance(target, bool)
        or not isinstance(target, numbers.Real)
        or not math.isfinite(target)
        or not lo <= target <= hi
    ):
        raise AllocationError(f"target={target!r} is infeasible; use a number from {lo} to {hi} (the widths)")


def _check_relevance(relative: Mapping[str, float], *, what: str = "relevance") -> None:
    """Reject values that would make an ordering or a weighted objective meaningless."""
    for name, value in relative.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise AllocationError(f"{what} of {name!r} is {value!r}; use a finite number >= 0")


def _blocks_of(layers: Collection[str], block_of: Mapping[str, str], block_order: Sequence[str]) -> dict[str, str]:
    """Map each layer to its block, failing on layers or blocks the caller did not describe."""
    if len(set(block_order)) != len(block_order):
        raise AllocationError(f"block_order={list(block_order)!r} repeats a block; list each block once")
    known = set(block_order)
    blocks: dict[str, str] = {}
    for name in layers:
        if name not in block_of:
            raise AllocationError(f"layer {name!r} is missing from block_of; give every scored layer a block")
        if block_of[name] not in known:
            raise AllocationError(
                f"block {block_of[name]!r} of layer {name!r} is not in block_order; add it to block_order"
            )
        blocks[name] = block_of[name]
    return blocks


def relative_importance(scores: Mapping[str, float], block_of: Mapping[str, str]) -> dict[str, float]:
    """Normalise raw scores so each block's layers sum to 1.

    LRP relevance is conserved layer to layer, so raw totals shrink or grow with depth; dividing by
    the block total makes layers of different blocks comparable. A block whose scores are all zero
    carries no information, so its layers share the block equally rather than dividing by zero.
    """
    _check_relevance(scores, what="score")
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, score in scores.items():
        if name not in block_of:
            raise AllocationError(f"layer {name!r} is missing from block_of; give every scored layer a block")
        block = block_of[name]
        totals[block] = totals.get(block, 0.0) + score
        counts[block] = counts.get(block, 0) + 1
    relative: dict[str, float] = {}
    for name, score in scores.items():
        block = block_of[name]
        relative[name] = score / totals[block] if totals[block] > 0 else 1.0 / counts[block]
    return relative


def paper_allocation(
    relative: Mapping[str, float],
    block_of: Mapping[str, str],
    block_order: Sequence[str],
    target: int,
    widths: tuple[int, int] = (3, 6),
    raised_blocks: int = 2,
) -> dict[str, int]:
    """The LRP-QViT rule: early blocks get one bit more, the least relevant later layers pay for it.

    The first blocks feed every later one, so their errors compound; raising all their layers and
    lowering an equal number of the least relevant remaining layers keeps the unweighted mean at
    exactly ``target``. Ties in relevance go to the lexicographically smaller name being lowered
    first, so the result does not depend on the mapping's order.
    """
    lo, hi = check_widths(widths)
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not lo <= target <= hi:
        raise AllocationError(f"target={target!r} is not usable; use an integer from {lo} to {hi}")
    if target != int(target):
        raise AllocationError(
            f"target={target!r}: the paper rule moves whole bits around an integer target; "
            "use allocator='exact' for a fractional one"
        )
    target = int(target)
    if isinstance(raised_blocks, bool) or not isinstance(raised_blocks, int) or raised_blocks < 0:
        raise AllocationError(f"raised_blocks={raised_blocks!r} is not usable; use an integer >= 0")
    _check_relevance(relative)
    blocks = _blocks_of(relative, block_of, block_order)
    early = set(block_order[:raised_blocks])
    raised = [name for name in relative if blocks[name] in early]
    others = sorted((name for name in relative if blocks[name] not in early), key=lambda n: (relative[n], n))
    if raised and target + 1 > hi:
        raise AllocationError(f"target={target} cannot be raised to {target + 1} within widths=({lo}, {hi})")
    if raised and target - 1 < lo:
        raise AllocationError(f"target={target} cannot be lowered to {target - 1} within widths=({lo}, {hi})")
    if len(raised) > len(others):
        raise AllocationError(
            f"raised_blocks={raised_blocks} raises {len(raised)} layers but only {len(others)} other layers "
            f"can be lowered; use raised_blocks small enough that at most half the layers are raised"
        )
    lowered = set(others[: len(raised)])
    raised_set = set(raised)
    return {name: target + 1 if name in raised_set else target - 1 if name in lowered else target for name in relative}


def _budget(target: float, n_layers: int) -> int:
    """Largest total bit count allowed by an unweighted mean of ``target`` over ``n_layers``."""
    total = target * n_layers
    nearest = round(total)
    return nearest if abs(total - nearest) <= _BUDGET_TOLERANCE * max(1, n_layers) else math.floor(total)


def exact_allocation(
    relative: Mapping[str, float],
    target: float,
    widths: tuple[int, int] = (3, 6),
    weights: Mapping[str, float] | None = None,
) -> dict[str, int]:
    """Optimal widths b_l in [lo, hi] maximising Σ w_l·r_l·u(b_l) subject to Σ b_l <= target·L.

    u(b) = −4^(−b) is the removed quantization noise power: a uniform b-bit quantizer's error
    variance is ∝ 4^(−b), so u is increasing and concave and each extra bit on a layer is worth a
    quarter of the previous one. ``weights`` (default 1) scale a layer's share of the objective,
    e.g. to count its size; they do not change the unit cost of a bit.

    Why greedy is exact: the objective is separable and every bit costs 1, so any allocation is
    ``lo`` per layer plus a set of K = budget − lo·L increments, and its value is the sum of their
    marginal gains. Per layer those gains are non-increasing, so the K largest gains overall (taken
    lowest level first within a layer) form a feasible allocation, and no set of K increments can
    sum to more. Since every gain is >= 0, spending the whole budget is optimal, so the total is
    exactly ``round(target·L)`` when that is an integer and ``floor(target·L)`` otherwise. Equal
    gains go to the smaller name, so the result is independent of the mapping's order.
    """
    lo, hi = check_widths(widths)
    _check_mean_target(target, lo, hi)
    _check_relevance(relative)
    scale = {name: 1.0 for name in relative}
    if weights is not None:
        missing = [name for name in relative if name not in weights]
        if missing:
            raise AllocationError(f"weights lack layer {missing[0]!r}; give a weight for every scored layer")
        _check_relevance({name: weights[name] for name in relative}, what="weight")
        scale = {name: float(weights[name]) for name in relative}
    increments = sorted(
        # Raising a layer to ``level`` bits gains w·r·(4^-(level-1) - 4^-level) = 3·w·r·4^-level; the common
        # factor 3 is dropped so that, unweighted, the keys are exact powers-of-two multiples of r.
        (-scale[name] * float(relative[name]) * 4.0**-level, name, level)
        for name in relative
        for level in range(lo + 1, hi + 1)
    )
    bits = {name: lo for name in relative}
    for _, name, _ in increments[: _budget(target, len(relative)) - lo * len(relative)]:
        bits[name] += 1
    return bits


@dataclass(frozen=True)
class Option:
    """One width a layer may take: the noise it leaves and what it costs in budget units."""

    bits: int
    noise: float
    cost: int


# Budgets are counted in at most this many units. Every plan pays each layer's cheapest option, so only
# the costs above it are counted, in units of their greatest common divisor (exact: a ViT-S's sizes above
# 3 bits are multiples of 768 parameters, 28k units at 4 bits). A budget still larger is scaled down with
# each cost rounded up, so a plan can never exceed it; the solution is then within a few units of the
# optimum's cost (74 layers: 0.04 %).
BUDGET_UNITS = 200_000


def least_noise(options: Mapping[str, Sequence[Option]], budget: int, *, spend_all: bool = False) -> dict[str, int]:
    """One option per layer with the least summed noise whose summed cost is at most ``budget``.

    A multiple-choice knapsack, solved exactly by dynamic programming over layers and budget units
    (no shape is assumed: measured noise curves need not be convex or monotone). With ``spend_all``
    the cost must equal the budget exactly. Equal totals keep the earlier option of a layer and the
    cheaper plan, so the result is deterministic.
    """
    if not options:
        raise AllocationError("no layers to allocate; give at least one layer")
    names = list(options)
    floor = {name: min(option.cost for option in options[name]) for name in names}
    spare = budget - sum(floor.values())
    extra = {name: [option.cost - floor[name] for option in options[name]] for name in names}
    unit = math.gcd(spare, *(cost for costs in extra.values() for cost in costs)) or 1
    scale = unit if spend_all else unit * max(1, math.ceil(spare / unit / BUDGET_UNITS))
    if spare < 0 or (spend_all and spare % unit):
        raise AllocationError(f"no choice of widths fits a budget of {budget}; widen the widths or change the target")
    if spend_all and spare // scale > 10 * BUDGET_UNITS:
        raise AllocationError(f"a budget of {budget} cannot be spent exactly in tractable time; allocate widths")
    units = spare // scale
    best = np.full(units + 1, np.inf)
    best[0] = 0.0
    picks = np.zeros((len(names), units + 1), dtype=np.int16)
    for index, name in enumerate(names):
        step = np.full(units + 1, np.inf)
        for choice, option in enumerate(options[name]):
            cost = -(-extra[name][choice] // scale)  # rounded up
            if cost > units:
                continue
            candidate = np.full(units + 1, np.inf)
            candidate[cost:] = best[: units + 1 - cost] + float(option.noise)
            better = candidate < step
            step[better] = candidate[better]
            picks[index, better] = choice
        best = step
    end = units if spend_all else int(np.argmin(best))
    if not math.isfinite(best[end]):
        raise AllocationError(f"no choice of widths fits a budget of {budget}; widen the widths or change the target")
    bits: dict[str, int] = {}
    for index in reversed(range(len(names))):
        choice = int(picks[index, end])
        bits[names[index]] = options[names[index]][choice].bits
        end -= -(-extra[names[index]][choice] // scale)
    return {name: bits[name] for name in names}


def noise_allocation(noise: Mapping[str, Mapping[int, float]], target: float) -> dict[str, int]:
    """Widths minimising the summed measured noise ``Σ noise[l][b_l]`` with ``Σ b_l`` exactly the budget.

    ``noise[l][b]`` is what layer ``l`` alone costs at ``b`` bits (e.g. logit noise power), measured
    for every width of one contiguous range. No shape is assumed (measured curves need not be convex
    or even monotone), so this is a knapsack solved exactly by dynamic programming over layers and
    bits spent: O(L · budget · widths). The budget is spent in full, so the unweighted mean equals the
    target as with the other allocators; equal totals keep the first choice found, layers in the
    mapping's order and widths from low to high, so the result is deterministic.
    """
    if not noise:
        raise AllocationError("no layers to allocate; measure the noise of at least one layer")
    widths = sorted(next(iter(noise.values())))
    if not widths or widths != list(range(widths[0], widths[-1] + 1)):
        raise AllocationError(f"measured widths {widths!r} are not a contiguous range; measure every width once")
    lo, hi = check_widths((widths[0], widths[-1]))
    for name, curve in noise.items():
        if sorted(curve) != widths:
            raise AllocationError(f"layer {name!r} was measured at {sorted(curve)!r}, the others at {widths!r}")
        _check_relevance({f"{name} at {b} bits": value for b, value in curve.items()}, what="noise")
    _check_mean_target(target, lo, hi)
    options = {name: [Option(bits, curve[bits], bits) for bits in widths] for name, curve in noise.items()}
    return least_noise(options, _budget(target, len(noise)), spend_all=True)


def make_bit_plan(
    relative: Mapping[str, float],
    block_of: Mapping[str, str],
    block_order: Sequence[str],
    *,
    wbits: float,
    abits: float,
    weight_layers: Collection[str],
    allocator: str = "paper",
    widths: tuple[int, int] = (3, 6),
) -> BitPlan:
    """Allocate activation bits over every scored layer and weight bits over the weighted ones.

    ``wbits`` and ``abits`` are mean-bits targets: integers for the paper rule, any number within
    ``widths`` (3.5, say) for the exact solver. Weightless layers (attention matmuls) get
    ``placeholder_wbits(wbits)``, which their quantizers ignore. The plan lists layers block by block
    in ``block_order``, and within a block in the order of ``relative``.
    """
    if allocator not in ALLOCATORS:
        raise AllocationError(f"allocator={allocator!r} is unknown; use one of: {', '.join(ALLOCATORS)}")
    for what, bits in (("wbits", wbits), ("abits", abits)):
        if isinstance(bits, bool) or not isinstance(bits, numbers.Real):
            raise AllocationError(f"{what}={bits!r} is not a number; use a mean-bits target within {widths!r}")
    blocks = _blocks_of(relative, block_of, block_order)
    unscored = sorted(set(weight_layers) - set(relative))
    if unscored:
        raise AllocationError(f"weight layer {unscored[0]!r} has no relevance; score every weight layer")
    weighted = {name: value for name, value in relative.items() if name in weight_layers}

    def allocate(scores: Mapping[str, float], target: float) -> dict[str, int]:
        if allocator == "paper":
            return paper_allocation(scores, block_of, block_order, target, widths)
        return exact_allocation(scores, target, widths)

    activation_bits = allocate(relative, abits)
    weight_bits = allocate(weighted, wbits)
    rank = {block: i for i, block in enumerate(block_order)}
    order = sorted(relative, key=lambda name: rank[blocks[name]])  # stable: keeps the given order in a block
    unused = placeholder_wbits(wbits)
    return BitPlan({name: LayerBits(weight_bits.get(name, unused), activation_bits[name]) for name in order})


def placeholder_wbits(target: float) -> int:
    """The weight width a plan records for a weightless layer (a matmul), which its quantizers ignore.

    The target rounded up: the target itself when it is an integer, so a plan's unweighted
    ``mean_bits("wbits")`` over all its layers stays the target there.
    """
    return math.ceil(target)
