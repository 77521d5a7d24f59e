"""Bit allocation: budgets, bounds, optimality against brute force, the paper rule, and plan I/O."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrpq.allocation.solvers import (
    AllocationError,
    Option,
    exact_allocation,
    least_noise,
    make_bit_plan,
    noise_allocation,
    paper_allocation,
    relative_importance,
)
from lrpq.config import BitPlan
from lrpq.errors import LrpqError

VIT_LAYERS = ("attn.qkv", "attn.matmul1", "attn.matmul2", "attn.proj", "mlp.fc1", "mlp.fc2")
WEIGHT_SUFFIXES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True)


def vit_blocks(n_blocks: int) -> tuple[dict[str, str], list[str]]:
    """block_of and block_order of a ViT with ``n_blocks`` blocks of the six quantized layers."""
    order = [f"blocks.{b}" for b in range(n_blocks)]
    return {f"{block}.{layer}": block for block in order for layer in VIT_LAYERS}, order


@st.composite
def scored_blocks(draw: st.DrawFn) -> tuple[dict[str, float], dict[str, str], list[str]]:
    """Raw scores (with ties and zeros likely) over 2–12 blocks of 4–6 layers, normalised per block."""
    n_blocks = draw(st.integers(2, 12))
    order = [f"blocks.{b}" for b in range(n_blocks)]
    block_of = {}
    for block in order:
        for layer in range(draw(st.integers(4, 6))):
            block_of[f"{block}.l{layer}"] = block
    raw = st.one_of(st.sampled_from([0.0, 1.0, 2.0]), st.floats(0.0, 1e3, allow_nan=False))
    scores = {name: draw(raw) for name in block_of}
    return relative_importance(scores, block_of), block_of, order


def objective(relative: dict[str, float], bits: dict[str, int], weights: dict[str, float]) -> float:
    return sum(weights[n] * relative[n] * -(4.0 ** -bits[n]) for n in relative)


# relative_importance


def test_relative_importance_normalises_within_each_block() -> None:
    block_of = {"a": "b0", "b": "b0", "c": "b1", "d": "b1", "e": "b2"}
    rel = relative_importance({"a": 1.0, "b": 3.0, "c": 0.0, "d": 0.0, "e": 5.0}, block_of)
    assert rel == {"a": 0.25, "b": 0.75, "c": 0.5, "d": 0.5, "e": 1.0}


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "1"])
def test_relative_importance_rejects_unusable_scores(bad: object) -> None:
    with pytest.raises(AllocationError, match="score of 'a'"):
        relative_importance({"a": bad, "b": 1.0}, {"a": "b0", "b": "b0"})


def test_relative_importance_needs_a_block_for_every_layer() -> None:
    with pytest.raises(AllocationError, match="'b' is missing from block_of"):
        relative_importance({"a": 1.0, "b": 1.0}, {"a": "b0"})


# paper_allocation


def test_paper_rule_on_a_hand_worked_example() -> None:
    block_of = {
        "b0.x": "b0",
        "b0.y": "b0",
        "b1.x": "b1",
        "b2.x": "b2",
        "b2.y": "b2",
        "b3.x": "b3",
        "b3.y": "b3",
    }
    order = ["b0", "b1", "b2", "b3"]
    relative = {"b0.x": 0.9, "b0.y": 0.1, "b1.x": 1.0, "b2.x": 0.2, "b2.y": 0.8, "b3.x": 0.2, "b3.y": 0.6}
    bits = paper_allocation(relative, block_of, order, target=4)
    # Three raised layers; the three least relevant others are b2.x, b3.x (tied at 0.2) and b3.y.
    assert bits == {"b0.x": 5, "b0.y": 5, "b1.x": 5, "b2.x": 3, "b2.y": 4, "b3.x": 3, "b3.y": 3}
    assert list(bits) == list(relative)


def test_paper_rule_breaks_ties_by_name_whatever_the_input_order() -> None:
    block_of = {"b0.a": "b0", "b1.z": "b1", "b1.y": "b1", "b1.x": "b1"}
    relative = {"b0.a": 1.0, "b1.z": 0.25, "b1.y": 0.25, "b1.x": 0.5}
    bits = paper_allocation(relative, block_of, ["b0", "b1"], target=4, raised_blocks=1)
    assert bits == {"b0.a": 5, "b1.z": 4, "b1.y": 3, "b1.x": 4}


@PROPERTY
@given(scored_blocks(), st.sampled_from([4, 5]), st.integers(0, 3))
def test_paper_rule_properties(
    case: tuple[dict[str, float], dict[str, str], list[str]], target: int, raised_blocks: int
) -> None:
    relative, block_of, order = case
    early = set(order[:raised_blocks])
    raised = [n for n in relative if block_of[n] in early]
    others = [n for n in relative if block_of[n] not in early]
    if len(raised) > len(others):
        with pytest.raises(AllocationError, match="can be lowered"):
            paper_allocation(relative, block_of, order, target, raised_blocks=raised_blocks)
        return
    bits = paper_allocation(relative, block_of, order, target, raised_blocks=raised_blocks)
    assert sum(bits.values()) == target * len(relative)
    assert all(bits[n] == target + 1 for n in raised)
    lowered = [n for n in others if bits[n] == target - 1]
    assert len(lowered) == len(raised)
    assert all(bits[n] in (target - 1, target) for n in others)
    for a, b in itertools.permutations(others, 2):
        if relative[a] > relative[b]:
            assert bits[a] >= bits[b], (a, b)
    shuffled = list(relative.items())
    random.Random(0).shuffle(shuffled)
    assert paper_allocation(dict(shuffled), block_of, order, target, raised_blocks=raised_blocks) == bits


@pytest.mark.parametrize(
    ("target", "widths", "message"),
    [
        (6, (3, 6), "cannot be raised to 7"),
        (3, (3, 6), "cannot be lowered to 2"),
        (7, (3, 6), "target=7 is not usable; use an integer from 3 to 6"),
        ("4", (3, 6), "target='4' is not usable"),
        (4.5, (3, 6), "target=4.5: the paper rule moves whole bits"),
        (4, (6, 3), r"widths=\(6, 3\) is not a valid range"),
        (4, (1, 6), r"widths=\(1, 6\)"),
        (4, (3, 9), r"widths=\(3, 9\)"),
        (4, [3, 6], r"widths=\[3, 6\]"),
    ],
)
def test_paper_rule_rejects_unreachable_widths(target: object, widths: object, message: str) -> None:
    block_of, order = vit_blocks(4)
    relative = relative_importance(dict.fromkeys(block_of, 1.0), block_of)
    with pytest.raises(AllocationError, match=message):
        paper_allocation(relative, block_of, order, target, widths)  # type: ignore[arg-type]


def test_paper_rule_needs_enough_layers_to_lower_and_known_blocks() -> None:
    block_of, order = vit_blocks(3)  # 12 raised layers, only 6 to lower
    relative = dict.fromkeys(block_of, 1.0)
    with pytest.raises(AllocationError, match="raises 12 layers but only 6"):
        paper_allocation(relative, block_of, order, 4)
    with pytest.raises(AllocationError, match=r"'blocks\.2' of layer 'blocks\.2\.attn\.qkv' is not in block_order"):
        paper_allocation(relative, block_of, order[:2], 4, raised_blocks=1)
    with pytest.raises(AllocationError, match="repeats a block"):
        paper_allocation(relative, block_of, [*order, "blocks.0"], 4, raised_blocks=1)
    # Without raised layers no bit moves, so a target at the top width is fine.
    assert set(paper_allocation(relative, block_of, order, 6, raised_blocks=0).values()) == {6}


# exact_allocation


def test_exact_on_a_hand_worked_example() -> None:
    # Budget 9 over widths 3–6: gains 0.9·3/4^4 > 0.9·3/4^5 > 0.1·3/4^4 > 0.1·3/4^5 and 0.9·3/4^6 > ...
    assert exact_allocation({"a": 0.9, "b": 0.1}, 4.5) == {"a": 5, "b": 4}
    # A 9x relevance ratio is worth log4(9) ≈ 1.6 bits, so an even budget splits 6/4 not 5/5.
    assert exact_allocation({"a": 0.9, "b": 0.1}, 5) == {"a": 6, "b": 4}
    assert exact_allocation({"a": 0.5, "b": 0.5}, 5) == {"a": 5, "b": 5}
    # Weights scale the objective: weighting b 81x makes it the 9x more important layer.
    assert exact_allocation({"a": 0.9, "b": 0.1}, 5, weights={"a": 1.0, "b": 81.0}) == {"a": 4, "b": 6}


def brute_force_best(relative: dict[str, float], budget: int, widths: tuple[int, int], weights) -> float:
    names = list(relative)
    best = -math.inf
    for combo in itertools.product(range(widths[0], widths[1] + 1), repeat=len(names)):
        if sum(combo) <= budget:
            best = max(best, objective(relative, dict(zip(names, combo, strict=True)), weights))
    return best


@settings(max_examples=120, deadline=None, derandomize=True)
@given(
    st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=6),
    st.integers(0, 12),
    st.one_of(st.none(), st.lists(st.floats(0.0, 50.0, allow_nan=False), min_size=6, max_size=6)),
)
def test_exact_matches_brute_force(scores: list[float], numerator: int, raw_weights: list[float] | None) -> None:
    widths = (3, 6)
    relative = {f"layer{i}": s for i, s in enumerate(scores)}
    target = 3 + numerator / 4  # 3, 3.25, ..., 6
    weights = dict(zip(relative, raw_weights, strict=False)) if raw_weights else dict.fromkeys(relative, 1.0)
    bits = exact_allocation(relative, target, widths, weights=weights if raw_weights else None)
    budget = math.floor(Fraction(numerator, 4) * len(scores)) + 3 * len(scores)
    assert sum(bits.values()) == budget
    assert all(widths[0] <= b <= widths[1] for b in bits.values())
    best = brute_force_best(relative, budget, widths, weights)
    assert math.isclose(objective(relative, bits, weights), best, rel_tol=1e-12, abs_tol=1e-15)


@PROPERTY
@given(scored_blocks(), st.integers(0, 30))
def test_exact_budget_bounds_determinism_and_monotonicity(
    case: tuple[dict[str, float], dict[str, str], list[str]], tenths: int
) -> None:
    relative, _, _ = case
    target = 3 + tenths / 10  # 3.0 … 6.0, mostly fractional
    bits = exact_allocation(relative, target)
    n = len(relative)
    total = sum(bits.values())
    if (tenths * n) % 10 == 0:
        assert total == round(target * n)
        assert Fraction(total, n) == Fraction(30 + tenths, 10)
    else:
        assert target * n - 1 < total <= target * n
    assert all(3 <= b <= 6 for b in bits.values())
    for a, b in itertools.permutations(relative, 2):
        if relative[a] > relative[b]:
            assert bits[a] >= bits[b], (a, b)
    shuffled = list(relative.items())
    random.Random(1).shuffle(shuffled)
    assert exact_allocation(dict(shuffled), target) == bits
    assert list(bits) == list(relative)


def test_noise_allocation_on_a_hand_worked_example() -> None:
    # a loses 9 units of noise from 3 to 4 bits, b only 1: at a mean of 3.5 the one extra bit goes to a.
    noise = {"a": {3: 10.0, 4: 1.0}, "b": {3: 2.0, 4: 1.0}}
    assert noise_allocation(noise, 3.5) == {"a": 4, "b": 3}
    # Measured curves need not be convex: c gains nothing from 4 bits but a lot from 5, so at a mean of
    # 4 the solver pays for both of c's bits instead of one bit each (greedy would take d's bit first).
    noise = {"c": {3: 9.0, 4: 9.0, 5: 0.0}, "d": {3: 3.0, 4: 0.0, 5: 0.0}}
    assert noise_allocation(noise, 4) == {"c": 5, "d": 3}


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    st.lists(st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=4, max_size=4), min_size=1, max_size=5),
    st.integers(0, 12),
)
def test_noise_allocation_matches_brute_force_and_spends_the_budget(curves: list[list[float]], numerator: int) -> None:
    widths = range(3, 7)
    noise = {f"layer{i}": dict(zip(widths, curve, strict=True)) for i, curve in enumerate(curves)}
    target = 3 + numerator / 4  # 3, 3.25, ..., 6
    bits = noise_allocation(noise, target)
    budget = math.floor(Fraction(numerator, 4) * len(curves)) + 3 * len(curves)
    assert sum(bits.values()) == budget
    assert all(3 <= b <= 6 for b in bits.values())
    best = min(
        sum(noise[name][b] for name, b in zip(noise, combo, strict=True))
        for combo in itertools.product(widths, repeat=len(noise))
        if sum(combo) == budget
    )
    assert math.isclose(sum(noise[name][b] for name, b in bits.items()), best, rel_tol=1e-12, abs_tol=1e-12)
    assert noise_allocation(noise, target) == bits  # deterministic


@pytest.mark.parametrize(
    ("noise", "target", "message"),
    [
        ({}, 4, "no layers"),
        ({"a": {3: 1.0, 5: 0.0}}, 4, "contiguous"),
        ({"a": {3: 1.0, 4: 0.0}, "b": {3: 1.0}}, 3, "measured at"),
        ({"a": {3: -1.0, 4: 0.0}}, 3, "noise of"),
        ({"a": {3: math.nan, 4: 0.0}}, 3, "noise of"),
        ({"a": {3: 1.0, 4: 0.0}}, 5, "infeasible"),
    ],
)
def test_noise_allocation_rejects_unusable_measurements(noise: dict, target: float, message: str) -> None:
    with pytest.raises(AllocationError, match=message):
        noise_allocation(noise, target)


def test_exact_counts_a_float_product_that_lands_on_an_integer_as_that_integer() -> None:
    relative = {f"l{i}": 1.0 for i in range(10)}
    assert sum(exact_allocation(relative, 3.3).values()) == 33  # 3.3 * 10 == 33.0 in floats, not 32.99...
    assert sum(exact_allocation({f"l{i}": 1.0 for i in range(3)}, 3.1).values()) == 9


@pytest.mark.parametrize(
    ("target", "widths", "message"),
    [
        (2.5, (3, 6), r"target=2.5 is infeasible; use a number from 3 to 6"),
        (6.5, (3, 6), r"target=6.5 is infeasible"),
        (math.nan, (3, 6), r"target=nan is infeasible"),
        (4, (5, 4), r"widths=\(5, 4\) is not a valid range"),
        (4, (3.0, 6), r"widths=\(3.0, 6\)"),
        (4, (3, 6, 8), r"widths=\(3, 6, 8\)"),
    ],
)
def test_exact_rejects_infeasible_targets_and_widths(target: float, widths: object, message: str) -> None:
    with pytest.raises(AllocationError, match=message):
        exact_allocation({"a": 1.0, "b": 0.5}, target, widths)  # type: ignore[arg-type]


def test_exact_rejects_bad_relevance_and_weights() -> None:
    with pytest.raises(AllocationError, match=r"relevance of 'b' is -0\.5"):
        exact_allocation({"a": 1.0, "b": -0.5}, 4)
    with pytest.raises(AllocationError, match="weights lack layer 'b'"):
        exact_allocation({"a": 1.0, "b": 0.5}, 4, weights={"a": 1.0})
    with pytest.raises(AllocationError, match="weight of 'a' is inf"):
        exact_allocation({"a": 1.0, "b": 0.5}, 4, weights={"a": math.inf, "b": 1.0})


# make_bit_plan


@pytest.mark.parametrize("allocator", ["paper", "exact"])
def test_make_bit_plan_round_trips_and_meets_both_budgets(allocator: str, tmp_path) -> None:
    block_of, order = vit_blocks(6)
    scores = {name: float((7 * i) % 11 + 1) for i, name in enumerate(block_of)}
    relative = relative_importance(scores, block_of)
    weight_layers = {n for n in block_of if n.endswith(WEIGHT_SUFFIXES)}
    # Give the plan shuffled blocks to check it is re-ordered by block_order, keeping in-block order.
    shuffled = dict(sorted(relative.items(), key=lambda item: -int(item[0].split(".")[1])))
    plan = make_bit_plan(shuffled, block_of, order, wbits=4, abits=5, weight_layers=weight_layers, allocator=allocator)
    assert list(plan.layers) == list(block_of)
    assert plan.mean_bits("abits") == 5
    assert plan.mean_bits("wbits") == 4
    assert sum(plan.layers[n].wbits for n in weight_layers) == 4 * len(weight_layers)
    assert all(plan.layers[n].wbits == 4 for n in block_of if n not in weight_layers)
    if allocator == "paper":
        assert all(plan.layers[f"blocks.{b}.{s}"].abits == 6 for b in (0, 1) for s in VIT_LAYERS)
        assert all(plan.layers[f"blocks.{b}.{s}"].wbits == 5 for b in (0, 1) for s in WEIGHT_SUFFIXES)
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = BitPlan.load(path)
    assert loaded == plan
    assert list(loaded.layers) == list(plan.layers)


def test_make_bit_plan_rejects_bad_requests() -> None:
    block_of, order = vit_blocks(4)
    relative = dict.fromkeys(block_of, 1.0)
    with pytest.raises(AllocationError, match="allocator='greedy' is unknown; use one of: paper, exact"):
        make_bit_plan(relative, block_of, order, wbits=4, abits=4, weight_layers=(), allocator="greedy")
    with pytest.raises(AllocationError, match="weight layer 'head' has no relevance"):
        make_bit_plan(relative, block_of, order, wbits=4, abits=4, weight_layers=["head"])
    with pytest.raises(AllocationError, match=r"abits='4' is not a number"):
        make_bit_plan(relative, block_of, order, wbits=4, abits="4", weight_layers=())  # type: ignore[arg-type]
    with pytest.raises(AllocationError, match=r"target=4.5: the paper rule moves whole bits.*allocator='exact'"):
        make_bit_plan(relative, block_of, order, wbits=4, abits=4.5, weight_layers=())
    with pytest.raises(AllocationError, match="cannot be raised to 7"):
        make_bit_plan(relative, block_of, order, wbits=4, abits=6, weight_layers=())


def test_exact_plan_at_fractional_targets_spends_the_floor_of_the_budget() -> None:
    block_of, order = vit_blocks(5)  # 30 layers, 20 with weights
    scores = {name: float((5 * i) % 13 + 1) for i, name in enumerate(block_of)}
    weight_layers = {n for n in block_of if n.endswith(WEIGHT_SUFFIXES)}
    relative = relative_importance(scores, block_of)
    plan = make_bit_plan(
        relative, block_of, order, wbits=3.5, abits=4.25, weight_layers=weight_layers, allocator="exact"
    )
    assert sum(plan.layers[n].wbits for n in weight_layers) == 70  # 3.5 · 20 exactly
    assert sum(bits.abits for bits in plan.layers.values()) == 127  # floor(4.25 · 30 = 127.5)
    assert {plan.layers[n].wbits for n in block_of if n not in weight_layers} == {4}  # placeholder: 3.5 rounded up
    assert all(3 <= bits.wbits <= 6 and 3 <= bits.abits <= 6 for bits in plan.layers.values())


def test_allocation_errors_are_user_errors() -> None:
    assert issubclass(AllocationError, LrpqError)


# least_noise: the multiple-choice knapsack under any cost


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    st.lists(
        st.lists(st.tuples(st.floats(0.0, 10.0, allow_nan=False), st.integers(0, 40)), min_size=1, max_size=4),
        min_size=1,
        max_size=4,
    ),
    st.integers(0, 120),
)
def test_least_noise_matches_brute_force_and_never_exceeds_the_budget(
    layers: list[list[tuple[float, int]]], budget: int
) -> None:
    options = {
        f"l{i}": [Option(bits, noise, cost) for bits, (noise, cost) in enumerate(choices)]
        for i, choices in enumerate(layers)
    }
    feasible = [
        combo
        for combo in itertools.product(*(range(len(choices)) for choices in layers))
        if sum(layers[i][j][1] for i, j in enumerate(combo)) <= budget
    ]
    if not feasible:
        with pytest.raises(AllocationError, match="fits a budget"):
            least_noise(options, budget)
        return
    chosen = least_noise(options, budget)
    picked = [options[name][bits] for name, bits in chosen.items()]
    assert sum(option.cost for option in picked) <= budget
    best = min(sum(layers[i][j][0] for i, j in enumerate(combo)) for combo in feasible)
    assert math.isclose(sum(option.noise for option in picked), best, rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 10**7), min_size=2, max_size=6), st.integers(3, 5))
def test_least_noise_holds_large_budgets_exactly_after_scaling(params: list[int], target: int) -> None:
    """Sizes in the millions are scaled to budget units with costs rounded up: the true total stays within."""
    options = {f"l{i}": [Option(b, 4.0**-b * (i + 1), p * b) for b in range(3, 7)] for i, p in enumerate(params)}
    budget = target * sum(params)
    chosen = least_noise(options, budget)
    assert sum(params[i] * chosen[f"l{i}"] for i in range(len(params))) <= budget


def test_least_noise_spends_all_of_an_exact_budget_or_says_it_cannot() -> None:
    options = {"a": [Option(3, 1.0, 3), Option(4, 0.0, 4)], "b": [Option(3, 1.0, 3), Option(4, 0.5, 4)]}
    assert least_noise(options, 7, spend_all=True) == {"a": 4, "b": 3}
    with pytest.raises(AllocationError, match="fits a budget of 9"):
        least_noise(options, 9, spend_all=True)
