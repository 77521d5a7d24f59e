"""Scale reparameterization with CRL clipping: factors by hand, exact folding, float equivalence end to end."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import FAMILIES, build_tiny, tiny_input
from torch import nn

from lrpq.api import prepare, quantize, set_mode, shiftable_attentions
from lrpq.config import QuantConfig
from lrpq.quantizers import QuantMode
from lrpq.reparam import (
    FoldFactors,
    InputReparam,
    clip_to_mean_std,
    ensure_bias,
    fold_into_norm_and_sink,
    fold_into_sink,
    layerwise_fold_factors,
    shift_keys,
)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


# ------------------------------------------------------------------------------------------------ clipping


def test_clip_to_mean_std_by_hand() -> None:
    # [0, 0, 0, 0, 10]: mean 2, population std sqrt((4·4 + 64) / 5) = 4.
    values = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0])
    assert clip_to_mean_std(values, 1.0).tolist() == [0.0, 0.0, 0.0, 0.0, 6.0]  # clamp to [-2, 6]
    assert clip_to_mean_std(values, 0.5).tolist() == [0.0, 0.0, 0.0, 0.0, 4.0]  # clamp to [0, 4]
    assert clip_to_mean_std(values, 3.0).tolist() == values.tolist()  # [-10, 14] holds everything
    assert clip_to_mean_std(-values, 1.0).tolist() == [0.0, 0.0, 0.0, 0.0, -6.0]
    assert clip_to_mean_std(values, None) is values


def test_clip_of_equal_values_is_a_no_op() -> None:
    values = torch.full((5,), 0.25)
    assert torch.equal(clip_to_mean_std(values, 2.0), values)


# ------------------------------------------------------------------------------------------------ factors


def test_fold_factors_by_hand() -> None:
    # Unclipped: target scale mean(1, 2, 3, 6) = 3, target zero point mean(0, 2, 4, 6) = 3.
    factors = layerwise_fold_factors(torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([0.0, 2.0, 4.0, 6.0]), None)
    assert factors.target_scale.item() == 3.0
    assert factors.target_zero_point.item() == 3.0
    torch.testing.assert_close(factors.r, torch.tensor([1 / 3, 2 / 3, 1.0, 2.0]))
    # b_c = min_c / r_c - min~ = (-z_c·s_c)·(s~ / s_c) + z~·s~ = (z~ - z_c)·s~
    torch.testing.assert_close(factors.b, torch.tensor([9.0, 3.0, -3.0, -9.0]))


@pytest.mark.parametrize("clip_k", [None, 0.5, 1.0, 2.0])
def test_fold_factors_map_every_channel_range_onto_the_target(clip_k: float | None) -> None:
    generator = torch.Generator().manual_seed(0)
    levels = 15
    scale = torch.rand(16, generator=generator) * 0.2 + 0.01
    scale[3] = 2.0  # an outlier channel
    zero_point = torch.randint(0, levels + 1, (16,), generator=generator).float()
    factors = layerwise_fold_factors(scale, zero_point, clip_k)

    clipped_scale, clipped_zero = clip_to_mean_std(scale, clip_k), clip_to_mean_std(zero_point, clip_k)
    channel_min, channel_max = -clipped_zero * clipped_scale, (levels - clipped_zero) * clipped_scale
    target_min = -factors.target_zero_point * factors.target_scale
    target_max = (levels - factors.target_zero_point) * factors.target_scale
    torch.testing.assert_close(channel_min / factors.r - factors.b, target_min.expand(16), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(channel_max / factors.r - factors.b, target_max.expand(16), rtol=1e-5, atol=1e-5)
    if clip_k is not None:
        # CRL: the outlier keeps part of its true range in the activation instead of all of it in r.
        true_max = (levels - zero_point[3]) * scale[3]
        assert true_max / factors.r[3] - factors.b[3] > target_max
        assert factors.r[3] < scale[3] / factors.target_scale


# ------------------------------------------------------------------------------------------------ folding


def random_norm_and_linear(channels: int, out: int, bias: bool, seed: int) -> tuple[nn.LayerNorm, nn.Linear]:
    torch.manual_seed(seed)
    norm, linear = nn.LayerNorm(channels), nn.Linear(channels, out, bias=bias)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels) * 2)
        norm.bias.copy_(torch.randn(channels))
    return norm, linear


def random_fold_factors(channels: int, clip_k: float | None, seed: int) -> FoldFactors:
    """Factors of random channel scales and integer zero points, as a channel-wise calibration gives."""
    generator = torch.Generator().manual_seed(seed)
    return layerwise_fold_factors(
        torch.rand(channels, generator=generator) * 0.5 + 0.01,
        torch.randint(0, 16, (channels,), generator=generator).float(),
        clip_k,
    )


@pytest.mark.parametrize("clip_k", [None, 0.5, 2.0])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_folding_preserves_linear_of_norm(clip_k: float | None, bias: bool) -> None:
    norm, linear = random_norm_and_linear(24, 10, bias, seed=1)
    x = torch.randn(7, 5, 24) * 3 + 1
    with torch.no_grad():
        expected, normed = linear(norm(x)), norm(x)
    factors = random_fold_factors(24, clip_k, seed=2)
    fold_into_norm_and_sink(norm, linear, factors)
    assert linear.bias is not None
    with torch.no_grad():
        assert relative_error(linear(norm(x)), expected) < 1e-5
        # The norm now emits the reparameterized activation x / r - b.
        torch.testing.assert_close(norm(x), normed / factors.r - factors.b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip_k", [None, 2.0])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_folding_into_the_sink_input_preserves_linear_of_gelu(clip_k: float | None, bias: bool) -> None:
    torch.manual_seed(4)
    linear = nn.Linear(24, 10, bias=bias)
    hidden = nn.functional.gelu(torch.randn(7, 5, 24) * torch.linspace(0.1, 6, 24))  # channel ranges differ
    reparam = InputReparam(24)
    with torch.no_grad():
        expected = linear(hidden)
        assert torch.equal(reparam(hidden), hidden)  # identity until a fold fills it in
    factors = random_fold_factors(24, clip_k, seed=5)
    fold_into_sink(reparam, linear, factors)
    with torch.no_grad():
        assert relative_error(linear(reparam(hidden)), expected) < 1e-5
        torch.testing.assert_close(reparam(hidden), hidden / factors.r - factors.b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "swin"])
def test_shifting_keys_by_any_vector_leaves_the_model_unchanged(family: str) -> None:
    """softmax(q·(k - c)ᵀ) = softmax(q·kᵀ): q·c is one number per query, also under Swin's bias and shift mask."""
    float_model = build_tiny(family)
    model = prepare(copy.deepcopy(float_model), QuantConfig())
    generator = torch.Generator().manual_seed(7)
    attentions = shiftable_attentions(model)
    assert attentions
    for attention in attentions.values():
        keys = attention.key_channels
        before = attention.qkv.bias.detach().clone()
        shift_keys(attention.qkv, keys, torch.randn(keys.stop - keys.start, generator=generator) * 5)
        changed = (attention.qkv.bias != before).nonzero().squeeze(1)
        assert changed.min() >= keys.start and changed.max() < keys.stop  # queries and values untouched
    x = tiny_input(family, batch=3, seed=4)
    with torch.no_grad():
        assert relative_error(model(x), float_model(x)) < 1e-5


def test_ensure_bias_adds_a_zero_bias_only_when_missing() -> None:
    linear = nn.Linear(4, 3, bias=False)
    bias = ensure_bias(linear)
    assert isinstance(bias, nn.Parameter) and linear.bias is bias
    assert torch.equal(bias, torch.zeros(3))
    assert ensure_bias(linear) is bias


# ------------------------------------------------------------------------------------------------ end to end


def with_random_norms(model: nn.Module, seed: int = 5) -> nn.Module:
    """Give every LayerNorm a non-trivial affine so channels really differ in range."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 3 + 0.1)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    return model


def swin_padded() -> nn.Module:
    name, kwargs, _ = FAMILIES["swin"]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**kwargs, "img_size": 36}).eval()


@pytest.mark.parametrize(
    ("make_model", "family", "image_size"),
    [
        (lambda: build_tiny("vit"), "vit", None),
        (lambda: build_tiny("swin"), "swin", None),
        (swin_padded, "swin", 36),
    ],
    ids=["vit", "swin", "swin_padded_windows"],
)
@pytest.mark.parametrize("clip_k", [2.0, None])
def test_quantize_with_crl_then_off_is_the_float_model(make_model, family: str, image_size, clip_k) -> None:
    float_model = with_random_norms(make_model())
    x = tiny_input(family, batch=4, seed=3)
    if image_size is not None:
        x = x[..., :image_size, :image_size]
    calib, check = x[:2], x[2:]
    model = quantize(copy.deepcopy(float_model), QuantConfig(wbits=4, abits=4, clip_k=clip_k), calib, progress=False)
    norm_name = "blocks.0.norm1" if family == "vit" else "layers.0.blocks.0.norm2"
    assert not torch.equal(model.get_submodule(norm_name).weight, float_model.get_submodule(norm_name).weight)
    fc2_name = "blocks.0.mlp.fc2" if family == "vit" else "layers.0.blocks.0.mlp.fc2"
    assert not torch.equal(
        model.get_submodule(fc2_name).input_reparam.r, torch.ones_like(model.get_submodule(fc2_name).input_reparam.r)
    )
    set_mode(model, QuantMode.OFF)
    with torch.no_grad():
        assert relative_error(model(check), float_model(check)) < 1e-5
