"""Mixed plans under every budget kind: the fixed plan's cost is never exceeded, and allocators compose."""

from __future__ import annotations

import math

import pytest
from conftest import build_tiny, tiny_input
from hypothesis import given, settings
from hypothesis import strategies as st

from lrpq.allocation.budget import LayerCost, plan_cost, target_cost
from lrpq.allocation.plans import check_request, mixed_plan, plan_widths, relevance_weights, weight_floor
from lrpq.allocation.solvers import AllocationError
from lrpq.config import QuantConfig
from lrpq.relevance import LayerScores

WIDTHS = range(3, 7)


@st.composite
def layered_model(draw: st.DrawFn) -> tuple[dict[str, LayerCost], dict, dict, dict[str, int]]:
    """Random layers (some weightless, one pinned) with random costs and noise curves."""
    costs, weight_curves, input_curves = {}, {}, {}
    for index in range(draw(st.integers(2, 8))):
        name = f"l{index}"
        weightless = draw(st.booleans()) and index > 0
        costs[name] = LayerCost(0 if weightless else draw(st.integers(1, 5000)), draw(st.integers(1, 10**6)))
        curve = sorted(draw(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=4, max_size=4)), reverse=True)
        input_curves[name] = dict(zip(WIDTHS, curve, strict=True))
        if not weightless:
            weight_curves[name] = dict(zip(WIDTHS, curve[::-1], strict=True))
    pinned = {"l0": 8} if draw(st.booleans()) else {}
    for name in pinned:
        input_curves.pop(name)
    return costs, weight_curves, input_curves, pinned


@settings(max_examples=120, deadline=None, derandomize=True)
@given(layered_model(), st.sampled_from(["layers", "size", "bops"]), st.sampled_from([3, 3.5, 4, 5.25, 6]))
def test_every_budget_kind_is_met(model, budget: str, target: float) -> None:
    costs, weight_curves, input_curves, pinned = model
    plan = plan_widths(weight_curves, input_curves, (target, target), budget, costs, pinned)
    assert set(plan.layers) == set(costs)
    assert all(3 <= bits.abits <= 6 or name in pinned for name, bits in plan.layers.items())
    cost, fixed = plan_cost(plan, costs), target_cost(costs, (target, target), pinned)
    weighted = [name for name in costs if costs[name].params]
    planned_inputs = [name for name in costs if name not in pinned]
    if budget == "layers":  # the paper's budget: the unweighted means, exactly (the floor of a fractional one)
        assert sum(plan.layers[name].wbits for name in weighted) == math.floor(target * len(weighted) + 1e-9)
        assert sum(plan.layers[name].abits for name in planned_inputs) == math.floor(
            target * len(planned_inputs) + 1e-9
        )
    else:
        assert cost.weight_bits <= fixed.weight_bits + 1e-6  # never bigger than fixed bits
    if budget == "bops":
        assert cost.bops <= fixed.bops + 1e-6  # and never more compute


def test_check_request_names_what_cannot_go_together() -> None:
    with pytest.raises(AllocationError, match="allocator 'magic' is unknown"):
        check_request("magic", "layers", 4, 4)
    with pytest.raises(AllocationError, match="budget 'joules' is unknown"):
        check_request("exact", "joules", 4, 4)
    with pytest.raises(AllocationError, match=r"paper rule .* not 'bops'"):
        check_request("paper", "bops", 4, 4)
    with pytest.raises(AllocationError, match=r"3\.5 bits"):
        check_request("paper", "layers", 3.5, 4)


def test_relevance_weights_are_block_shares_over_their_mean_to_the_power_gamma() -> None:
    scores = LayerScores(
        {"patch_embed.proj": 5.0, "b.qkv": 1.0, "b.proj": 3.0, "head": 2.0},
        {"patch_embed.proj": "patch_embed", "b.qkv": "b", "b.proj": "b", "head": "head"},
        ["patch_embed", "b", "head"],
        num_images=1,
    )
    names = ["patch_embed.proj", "b.qkv", "b.proj", "head"]
    weights = relevance_weights(scores, names, 1.0)  # shares 0.25 and 0.75, mean 0.5
    assert weights == {"patch_embed.proj": 1.0, "b.qkv": 0.5, "b.proj": 1.5, "head": 1.0}
    assert relevance_weights(scores, names, 0.0) == dict.fromkeys(names, 1.0)
    assert relevance_weights(scores, names, 0.5)["b.proj"] == pytest.approx(math.sqrt(1.5))


def test_relevance_weights_by_kind_compare_a_layer_with_its_kind_in_other_blocks() -> None:
    names = ["patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"]
    raw = [5.0, 1.0, 0.01, 3.0, 0.03]  # fc1 scores 100 times smaller than qkv's, as a mean over a wider output
    blocks = ["patch_embed", "blocks.0", "blocks.0", "blocks.1", "blocks.1"]
    scores = LayerScores(dict(zip(names, raw, strict=True)), dict(zip(names, blocks, strict=True)), blocks, 1)
    weights = relevance_weights(scores, names, 1.0, "kind")  # qkv mean 2, fc1 mean 0.02
    assert weights == pytest.approx(
        {
            "patch_embed.proj": 1.0,
            "blocks.0.attn.qkv": 0.5,
            "blocks.0.mlp.fc1": 0.5,
            "blocks.1.attn.qkv": 1.5,
            "blocks.1.mlp.fc1": 1.5,
        }
    )
    by_block = relevance_weights(scores, names, 1.0, "block")  # the same blocks' shares: fc1 ≈ 0.01 × qkv
    assert by_block["blocks.0.mlp.fc1"] < 0.02 * by_block["blocks.0.attn.qkv"]
    with pytest.raises(AllocationError, match="relevance scale 'layer' is unknown"):
        relevance_weights(scores, names, 1.0, "layer")


def test_relevance_allocator_without_relevance_weight_is_the_sensitivity_allocator() -> None:
    model, calib = build_tiny("vit"), tiny_input("vit", 4)
    plans = {
        allocator: mixed_plan(
            model, QuantConfig(4, 4), calib, allocator=allocator, relevance_weight=0.0, noise_images=2, progress=False
        )
        for allocator in ("sensitivity", "relevance")
    }
    assert plans["relevance"].plan == plans["sensitivity"].plan
    assert plans["relevance"].scores is not None and plans["sensitivity"].scores is None
    for mixed in plans.values():  # the default budget: BOPs, and the fixed plan's size
        assert mixed.budget == "bops"
        assert mixed.cost.bops <= mixed.fixed_cost.bops and mixed.cost.weight_bits <= mixed.fixed_cost.weight_bits


def test_min_wbits_keeps_weights_at_or_above_it_and_leaves_activations_free() -> None:
    model, calib = build_tiny("vit"), tiny_input("vit", 4)
    config = QuantConfig(3, 3)
    free = mixed_plan(model, config, calib, allocator="sensitivity", noise_images=2, min_wbits=None, progress=False)
    floored = mixed_plan(model, config, calib, allocator="sensitivity", noise=free.noise, min_wbits=3, progress=False)
    weighted = [name for name in floored.plan.layers if name in free.noise.curves("weight")]
    assert any(free.plan.layers[name].wbits == 2 for name in weighted)  # without the floor, some go below
    assert weighted and all(floored.plan.layers[name].wbits == 3 for name in weighted)  # 3 is also the target
    assert {bits.abits for bits in floored.plan.layers.values()} - {3}  # inputs still move
    assert weight_floor(6, (5, 7), 3) == 5  # a floor under the widths is already met
    with pytest.raises(AllocationError, match="min_wbits=7 is above the widths 2–6"):
        mixed_plan(model, config, calib, allocator="sensitivity", noise=free.noise, min_wbits=7, progress=False)
