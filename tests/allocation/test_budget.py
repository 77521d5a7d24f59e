"""What a plan costs: MACs and parameters counted by hand on a tiny ViT, and the three budget units."""

from __future__ import annotations

import pytest
from conftest import build_tiny

from lrpq.allocation.budget import LayerCost, layer_costs, plan_cost, target_cost
from lrpq.config import BitPlan, LayerBits


def test_layer_costs_of_a_tiny_vit_by_hand() -> None:
    # 32 px, patch 8: 16 patches + the class token = 17 tokens of 48 channels, 2 heads of 24, MLP 192, 5 classes.
    costs = layer_costs(build_tiny("vit"), (3, 32, 32))
    tokens, dim, heads, head_dim, hidden = 17, 48, 2, 24, 192
    assert costs["patch_embed.proj"] == LayerCost(48 * 3 * 8 * 8, 16 * 48 * 3 * 8 * 8)
    assert costs["blocks.0.attn.qkv"] == LayerCost(dim * 3 * dim, tokens * dim * 3 * dim)
    assert costs["blocks.0.attn.matmul1"] == LayerCost(0, heads * tokens * head_dim * tokens)  # q·kᵀ
    assert costs["blocks.0.attn.matmul2"] == LayerCost(0, heads * tokens * tokens * head_dim)  # attn·v
    assert costs["blocks.1.mlp.fc2"] == LayerCost(hidden * dim, tokens * hidden * dim)
    assert costs["head"] == LayerCost(dim * 5, dim * 5)  # the class token only
    assert len(costs) == 2 + 2 * 6


def test_plan_cost_counts_size_and_bops_by_hand() -> None:
    costs = {"fc": LayerCost(params=10, macs=100), "mm": LayerCost(params=0, macs=50)}
    plan = BitPlan({"fc": LayerBits(3, 5), "mm": LayerBits(4, 6)})
    cost = plan_cost(plan, costs)
    assert cost.weight_bits == 30 and cost.param_weighted_wbits == 3.0
    assert cost.bops == 100 * 3 * 5 + 50 * 6 * 6  # a matmul reads two activations at the input width
    assert (cost.mean_wbits, cost.mean_abits) == (3.0, 5.5)  # weights over layers that have them
    fixed = target_cost(costs, (4, 4))
    assert fixed.weight_bits == 40 and fixed.bops == 100 * 16 + 50 * 16
    assert cost.to_json_dict(fixed)["size_vs_fixed"] == 0.75
    assert target_cost(costs, (4, 4), {"fc": 8}).bops == 100 * 4 * 8 + 50 * 16  # a pinned input keeps its width


@pytest.mark.parametrize("bits", [3.5, 4])
def test_target_cost_of_a_fractional_mean_is_counted_as_it_is(bits: float) -> None:
    costs = {"fc": LayerCost(params=10, macs=100)}
    assert target_cost(costs, (bits, bits)).bops == 100 * bits * bits
