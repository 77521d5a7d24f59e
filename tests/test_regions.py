"""LayerNorm → Linear regions, found from the registered block classes, never from module names."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import FAMILIES, build_tiny
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

import lrpq.regions
from lrpq.regions import (
    Region,
    RegionError,
    find_activation_sinks,
    find_regions,
    register_activation_regions,
    register_regions,
)


def test_vit_regions_are_norm1_to_qkv_and_norm2_to_fc1() -> None:
    depth = FAMILIES["vit"][1]["depth"]
    expected = [
        region
        for i in range(depth)
        for region in (
            Region(f"blocks.{i}.norm1", f"blocks.{i}.attn.qkv"),
            Region(f"blocks.{i}.norm2", f"blocks.{i}.mlp.fc1"),
        )
    ]
    assert find_regions(build_tiny("vit")) == expected
    # The final norm feeds the head through pooling, not channel for channel: it is no region.
    assert all(region.norm != "norm" for region in find_regions(build_tiny("deit_distilled")))


def swin_expected(stages: list[tuple[int, bool]]) -> list[Region]:
    """Regions of a Swin model whose stage s has ``depth`` blocks and padded (True) or exact windows."""
    regions = []
    for stage, (depth, padded) in enumerate(stages):
        if stage > 0:
            regions.append(Region(f"layers.{stage}.downsample.norm", f"layers.{stage}.downsample.reduction"))
        for i in range(depth):
            block = f"layers.{stage}.blocks.{i}"
            if not padded:
                regions.append(Region(f"{block}.norm1", f"{block}.attn.qkv"))
            regions.append(Region(f"{block}.norm2", f"{block}.mlp.fc1"))
    return regions


def test_swin_regions_include_the_patch_merging_norm() -> None:
    # 56 px / patch 4 = 14×14 tokens (two 7×7 windows per side), then 7×7: no padding anywhere.
    assert find_regions(build_tiny("swin")) == swin_expected([(2, False), (2, False)])


def test_swin_blocks_with_padded_windows_have_no_norm1_region() -> None:
    name, kwargs, _ = FAMILIES["swin"]
    # 36 px / 4 = 9×9 tokens: 7×7 windows need padding in stage 0; stage 1 is 5×5, one 5×5 window.
    model = timm.create_model(name, pretrained=False, **{**kwargs, "img_size": 36})
    assert find_regions(model) == swin_expected([(2, True), (2, False)])


def test_single_swin_block_not_a_multiple_of_its_window() -> None:
    block = SwinTransformerBlock(dim=24, input_resolution=(9, 9), num_heads=2, window_size=7)
    assert find_regions(block) == [Region("norm2", "mlp.fc1")]
    block = SwinTransformerBlock(dim=24, input_resolution=(14, 7), num_heads=2, window_size=7)
    assert find_regions(block) == [Region("norm1", "attn.qkv"), Region("norm2", "mlp.fc1")]


@pytest.mark.parametrize(
    "make_model",
    [
        lambda: nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4)),
        lambda: timm.create_model("resnet18", pretrained=False, num_classes=5),
    ],
    ids=["layernorm_linear_sequential", "resnet18"],
)
def test_no_regions_without_registered_blocks(make_model) -> None:
    assert find_regions(make_model()) == []


class NormLinearBlock(nn.Module):
    def __init__(self, norm: nn.Module, sink: nn.Module) -> None:
        super().__init__()
        self.pre = norm
        self.inner = nn.Sequential(sink)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.pre(x))


@pytest.fixture
def isolated_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lrpq.regions, "_REGION_RULES", dict(lrpq.regions._REGION_RULES))
    monkeypatch.setattr(lrpq.regions, "_ACTIVATION_RULES", dict(lrpq.regions._ACTIVATION_RULES))


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "swin"])
def test_every_mlp_fc2_is_an_activation_sink(family: str) -> None:
    model = build_tiny(family)
    expected = [
        name.removesuffix(".act") + ".fc2" for name, module in model.named_modules() if isinstance(module, nn.GELU)
    ]
    assert expected and find_activation_sinks(model) == expected


def test_mlp_with_a_norm_before_fc2_has_no_activation_sink() -> None:
    # timm's scale_mlp_norm puts a LayerNorm between the activation and fc2: GELU is not its source.
    from timm.layers import Mlp

    assert find_activation_sinks(Mlp(8, 16, norm_layer=nn.LayerNorm)) == []
    assert find_activation_sinks(Mlp(8, 16)) == ["fc2"]


@pytest.mark.usefixtures("isolated_rules")
def test_register_regions_for_a_custom_block() -> None:
    model = nn.Sequential(nn.Linear(3, 8), NormLinearBlock(nn.LayerNorm(8), nn.Linear(8, 2)))
    assert find_regions(model) == []
    register_regions(NormLinearBlock, lambda block: [("pre", "inner.0")])
    assert find_regions(model) == [Region("1.pre", "1.inner.0")]
    # The block itself as the model: names relative to it, with no leading dot.
    assert find_regions(model[1]) == [Region("pre", "inner.0")]


@pytest.mark.usefixtures("isolated_rules")
def test_register_activation_regions_for_a_custom_block() -> None:
    block = NormLinearBlock(nn.SiLU(), nn.Linear(8, 2))
    assert find_activation_sinks(block) == []
    register_activation_regions(NormLinearBlock, lambda block: [("pre", "inner.0")])
    assert find_activation_sinks(nn.Sequential(block)) == ["0.inner.0"]


@pytest.mark.usefixtures("isolated_rules")
@pytest.mark.parametrize(
    ("norm", "sink", "message"),
    [
        (nn.LayerNorm(8), nn.Linear(6, 2), r"'0\.pre' has 8 channels but '0\.inner\.0' takes 6"),
        (nn.BatchNorm1d(8), nn.Linear(8, 2), r"'0\.pre' is BatchNorm1d"),
        (nn.LayerNorm(8, elementwise_affine=False), nn.Linear(8, 2), r"'0\.pre' is LayerNorm, expected .*weight"),
        (nn.LayerNorm(8), nn.Conv1d(8, 2, 1), r"'0\.inner\.0' is Conv1d, expected a Linear"),
    ],
    ids=["channel_mismatch", "not_layernorm", "no_affine", "sink_not_linear"],
)
def test_invalid_registration_raises_region_error(norm: nn.Module, sink: nn.Module, message: str) -> None:
    register_regions(NormLinearBlock, lambda block: [("pre", "inner.0")])
    with pytest.raises(RegionError, match=message):
        find_regions(nn.Sequential(NormLinearBlock(norm, sink)))
