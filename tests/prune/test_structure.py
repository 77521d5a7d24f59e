"""Pruned structures: the surgery removes exactly the pruned units' contributions; 0 % is the identity; JSON."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import FAMILIES, build_tiny, tiny_input
from timm.layers import LayerScale

from lrpq.explicit_attention import explicit_attention
from lrpq.prune.structure import (
    BlockKeep,
    PrunedStructure,
    StructureError,
    apply_structure,
    head_channels,
    head_dim,
    kept_count,
    prunable_blocks,
    unpruned,
)


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model whose LayerScale γ (DINOv2: 1e-5 at init) is random, so every branch matters and γ is exercised."""
    model = build_tiny(family, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LayerScale):
                module.gamma.copy_(torch.randn(module.gamma.shape, generator=generator))
    return model


def some_structure(model: torch.nn.Module, seed: int = 0) -> PrunedStructure:
    """Every block keeps a random non-empty subset of its heads and about half its hidden channels."""
    generator = torch.Generator().manual_seed(seed)
    blocks = {}
    for name, block in prunable_blocks(model).items():
        heads, hidden = block.attn.num_heads, block.mlp.fc1.out_features
        kept_heads = sorted(torch.randperm(heads, generator=generator)[: max(1, heads // 2)].tolist())
        kept_hidden = sorted(torch.randperm(hidden, generator=generator)[: hidden // 2].tolist())
        blocks[name] = BlockKeep(heads, hidden, kept_heads, kept_hidden)
    return PrunedStructure(blocks)


def with_units_silenced(model: torch.nn.Module, structure: PrunedStructure) -> torch.nn.Module:
    """The unpruned model with the pruned heads' proj columns and pruned channels' fc2 columns set to zero."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, block in prunable_blocks(reference).items():
            keep = structure.blocks[name]
            heads = [h for h in range(keep.num_heads) if h not in keep.heads]
            if heads:
                block.attn.proj.weight[:, head_channels(heads, head_dim(block.attn))] = 0
            hidden = [c for c in range(keep.hidden_features) if c not in keep.hidden]
            block.mlp.fc2.weight[:, hidden] = 0
    return reference


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_model_equals_the_original_with_pruned_units_silenced(family: str) -> None:
    model = build(family)
    structure = some_structure(model)
    assert not structure.is_identity()
    pruned = apply_structure(copy.deepcopy(model), structure)
    x = tiny_input(family)
    with torch.no_grad():
        expected = with_units_silenced(model, structure)(x)
        torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=0)
        assert not torch.allclose(model(x), expected, atol=1e-3)  # the silenced units did contribute
    for name, block in prunable_blocks(pruned).items():
        keep = structure.blocks[name]
        assert block.attn.num_heads == len(keep.heads)
        assert (
            block.attn.qkv.weight.shape[0] == block.attn.qkv.out_features == 3 * len(keep.heads) * head_dim(block.attn)
        )
        assert block.attn.proj.in_features == block.attn.proj.weight.shape[1] == len(keep.heads) * head_dim(block.attn)
        assert block.mlp.fc1.out_features == block.mlp.fc2.in_features == len(keep.hidden)
        if family == "swin":
            assert block.attn.relative_position_bias_table.shape[1] == len(keep.heads)
        else:
            assert block.attn.attn_dim == len(keep.heads) * block.attn.head_dim


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_fused_attention_path_agrees(family: str) -> None:
    """timm's scaled_dot_product_attention path reads the same num_heads as the explicit one."""
    model = apply_structure(build_tiny(family), some_structure(build_tiny(family), seed=3))
    x = tiny_input(family)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = True
        with explicit_attention(model.modules()):
            explicit = model(x)
        torch.testing.assert_close(model(x), explicit, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruning_nothing_is_the_identity(family: str) -> None:
    model = build_tiny(family)
    pruned = apply_structure(copy.deepcopy(model), unpruned(model))
    x = tiny_input(family)
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in model.parameters())
    assert unpruned(model).is_identity()


@pytest.mark.parametrize(
    ("units", "fraction", "kept"),
    [(3, 0.25, 3), (6, 0.25, 5), (4, 0.25, 3), (10, 0.3, 7), (10, 0.7, 3), (768, 0.3, 538), (4, 0.999, 1), (5, 0, 5)],
)
def test_kept_count_rounds_the_kept_share_up(units: int, fraction: float, kept: int) -> None:
    assert kept_count(units, fraction) == kept


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_fractions_outside_zero_one_are_refused(fraction: float) -> None:
    with pytest.raises(StructureError, match=r"\[0, 1\)"):
        kept_count(4, fraction)


def test_json_round_trip_and_composition() -> None:
    model = build_tiny("vit")
    first = some_structure(model, seed=1)
    assert PrunedStructure.from_json_dict(first.to_json_dict()) == first
    once = apply_structure(copy.deepcopy(model), first)
    second = some_structure(once, seed=2)
    twice = apply_structure(copy.deepcopy(once), second)
    composed = apply_structure(copy.deepcopy(model), first.then(second))
    x = tiny_input("vit")
    with torch.no_grad():
        assert torch.equal(twice(x), composed(x))


@pytest.mark.parametrize(
    ("heads", "hidden", "match"),
    [([1, 0], [0], "increasing"), ([], [0], "non-empty"), ([0, 2], [0], "below 2"), ([0], [0, 0], "unique")],
)
def test_invalid_kept_indices_are_refused(heads: list[int], hidden: list[int], match: str) -> None:
    with pytest.raises(StructureError, match=match):
        BlockKeep(2, 4, heads, hidden)


def test_malformed_json_and_mismatched_models_are_refused() -> None:
    with pytest.raises(StructureError, match="not a pruned structure"):
        PrunedStructure.from_json_dict({"format": 1, "blocks": {"blocks.0": {"heads": [0]}}})
    structure = unpruned(build_tiny("vit"))
    with pytest.raises(StructureError, match="kwargs"):
        apply_structure(build_tiny("dinov2"), PrunedStructure({"blocks.0": BlockKeep(4, 192, [0], [0])}))
    with pytest.raises(StructureError, match="does not have"):
        apply_structure(build_tiny("swin"), structure)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"scale_attn_norm": True}, "merged heads"), ({"scale_mlp_norm": True}, "hidden")]
)
def test_norms_that_mix_units_are_refused(kwargs: dict, match: str) -> None:
    timm_name, base, _ = FAMILIES["vit"]
    model = timm.create_model(timm_name, pretrained=False, **base, **kwargs)
    with pytest.raises(StructureError, match=match):
        prunable_blocks(model)


def test_models_without_blocks_are_refused() -> None:
    with pytest.raises(StructureError, match="no timm ViT"):
        prunable_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
