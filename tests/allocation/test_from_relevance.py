"""Relevance scores → bit plan → quantized model, on a tiny ViT deep enough for the paper rule."""

from __future__ import annotations

import pytest
import timm
import torch

from lrpq.allocation.from_relevance import allocatable, plan_from_scores, relevance_bit_plan, widths_for
from lrpq.allocation.solvers import AllocationError
from lrpq.api import quant_layers, quantize
from lrpq.config import QuantConfig
from lrpq.modules import QuantMatMul

DEPTH = 4
LAYERS = ("attn.qkv", "attn.matmul1", "attn.matmul2", "attn.proj", "mlp.fc1", "mlp.fc2")
WEIGHTED = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "depth": DEPTH, "embed_dim": 48, "num_heads": 2, "num_classes": 5}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_plan_covers_exactly_the_block_layers_and_meets_the_budget() -> None:
    plan, scores = relevance_bit_plan(tiny_vit(), images(), wbits=4, abits=4, progress=False)
    expected = [f"blocks.{i}.{layer}" for i in range(DEPTH) for layer in LAYERS]
    assert list(plan.layers) == expected  # patch embedding and head keep the default widths
    assert "patch_embed.proj" in scores.scores and "head" in scores.scores  # but are still scored
    assert plan.mean_bits("abits") == 4
    weighted = [plan.layers[f"blocks.{i}.{layer}"].wbits for i in range(DEPTH) for layer in WEIGHTED]
    assert sum(weighted) / len(weighted) == 4
    assert all(3 <= bits.wbits <= 6 and 3 <= bits.abits <= 6 for bits in plan.layers.values())


def test_paper_rule_raises_the_first_two_blocks_and_lowers_the_least_relevant() -> None:
    model = tiny_vit()
    plan, scores = relevance_bit_plan(model, images(), wbits=4, abits=4, progress=False)
    for i in (0, 1):
        assert all(plan.layers[f"blocks.{i}.{layer}"].abits == 5 for layer in LAYERS)
    later = {
        name: value
        for name, value in allocatable(scores).relative().items()
        if not name.startswith(("blocks.0.", "blocks.1."))
    }
    lowered = sorted(later, key=lambda name: (later[name], name))[: 2 * len(LAYERS)]
    assert {name for name in later if plan.layers[name].abits == 3} == set(lowered)


def test_exact_allocator_reaches_fractional_targets_and_plan_drives_the_quantizers() -> None:
    model = tiny_vit()
    _, scores = relevance_bit_plan(model, images(), wbits=4, abits=4, progress=False)
    plan = plan_from_scores(model, scores, wbits=6, abits=5, allocator="exact")
    assert plan.mean_bits("abits") == 5
    quantized = quantize(model, QuantConfig(6, 5).with_plan(plan), images(), progress=False)
    for name, layer in quant_layers(quantized).items():
        if name not in plan.layers:
            continue
        if isinstance(layer, QuantMatMul):
            assert layer.a_quantizer.bits == layer.b_quantizer.bits == plan.layers[name].abits
        else:
            assert layer.input_quantizer.bits == plan.layers[name].abits
            assert layer.weight_quantizer.bits == plan.layers[name].wbits


def test_same_images_give_the_same_plan() -> None:
    first, _ = relevance_bit_plan(tiny_vit(), images(), wbits=4, abits=4, progress=False)
    second, _ = relevance_bit_plan(tiny_vit(), images(), wbits=4, abits=4, progress=False)
    assert first == second


def test_default_widths_widen_to_reach_target_plus_and_minus_one() -> None:
    assert widths_for(4, 4) == (3, 6)
    assert widths_for(6, 6) == (3, 7)
    assert widths_for(3, 4) == (2, 6)
    assert widths_for(8, 8) == (3, 8)  # capped at the widest grid the primitives accept
    assert widths_for(3.5, 3.5) == (3, 6)  # a fractional target needs only its two neighbours
    assert widths_for(6.5, 4) == (3, 7)
    assert widths_for(6, 6, (4, 6)) == (4, 6)


@pytest.mark.parametrize(
    ("widths", "message"),
    [((4, 5), "target 6 bits is outside the allowed widths 4–5"), ((5, 9), "widths=\\(5, 9\\) is not a valid range")],
)
def test_given_widths_are_checked_before_any_work(widths: tuple[int, int], message: str) -> None:
    with pytest.raises(AllocationError, match=message):
        widths_for(6, 6, widths)


def test_six_bit_mixed_plan_raises_the_first_blocks_to_seven() -> None:
    plan, _ = relevance_bit_plan(tiny_vit(), images(), wbits=6, abits=6, progress=False)
    assert plan.mean_bits("abits") == 6
    # Four blocks: the 12 raised layers of blocks 0-1 are paid for by all 12 layers of blocks 2-3.
    assert {bits.abits for bits in plan.layers.values()} == {5, 7}
    assert all(plan.layers[f"blocks.0.{layer}"].abits == 7 for layer in LAYERS)
