"""Scale reparameterization with CRL clipping: factors by hand, exact folding, float equivalence end to end."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import FAMILIES, build_tiny, tiny_input
from torch import nn

from lrpq.api import (
    prepare,
    quantize,
    rotatable_attentions,
    rotate_attention_heads,
    set_mode,
    shiftable_attentions,
    weighted_layers,
)
from lrpq.config import QuantConfig
from lrpq.observers import UniformObserver
from lrpq.quantizers import QuantMode
from lrpq.reparam import (
    FoldFactors,
    InputReparam,
    clip_to_mean_std,
    ensure_bias,
    fold_into_norm_and_sink,
    fold_into_sink,
    head_rotation,
    layerwise_fold_factors,
    rotate_heads,
    rotate_sink_input,
    shift_keys,
)
from lrpq.rotation import hadamard_factors


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


@pytest.mark.parametrize("clip_k", [None, 2.0])
def test_rotating_then_folding_the_sink_input_preserves_linear_of_gelu(clip_k: float | None) -> None:
    torch.manual_seed(4)
    linear = nn.Linear(96, 10)
    hidden = nn.functional.gelu(torch.randn(7, 5, 96) * torch.linspace(0.1, 6, 96))
    reparam = InputReparam(96, rotate=True)
    with torch.no_grad():
        expected = linear(hidden)
        assert torch.equal(reparam(hidden), hidden)  # identity until the rotation and fold are filled in
    rotate_sink_input(reparam, linear)
    rotated = (hidden.double() @ torch.kron(*hadamard_factors(96))).float()
    with torch.no_grad():
        torch.testing.assert_close(reparam.rotate(hidden), rotated, rtol=0, atol=1e-5)
        assert relative_error(linear(reparam(hidden)), expected) < 1e-5
    factors = random_fold_factors(96, clip_k, seed=5)
    fold_into_sink(reparam, linear, factors)
    with torch.no_grad():
        assert relative_error(linear(reparam(hidden)), expected) < 1e-5
        torch.testing.assert_close(reparam(hidden), rotated / factors.r - factors.b, rtol=1e-5, atol=1e-5)


def test_rotating_a_sink_input_needs_a_reparam_built_with_a_rotation() -> None:
    with pytest.raises(ValueError, match="rotate=True"):
        rotate_sink_input(InputReparam(96), nn.Linear(96, 10))


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


# ------------------------------------------------------------------------------------------------ head rotation


@pytest.mark.parametrize("head_dim", [1, 2, 8, 64])
def test_head_rotation_of_a_power_of_two_is_the_scaled_hadamard_matrix(head_dim: int) -> None:
    rotation = head_rotation(head_dim)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(head_dim, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(rotation.abs(), torch.full_like(rotation, head_dim**-0.5), rtol=0, atol=1e-15)
    assert torch.all(rotation[0] > 0) and torch.all(rotation[:, 0] > 0)  # Sylvester's: first row and column +


@pytest.mark.parametrize("head_dim", [3, 12, 24])
def test_head_rotation_of_other_sizes_is_a_fixed_orthogonal_matrix(head_dim: int) -> None:
    rotation = head_rotation(head_dim)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(head_dim, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(rotation, head_rotation(head_dim))  # the same for every call: runs are reproducible
    assert rotation.abs().amax() < 0.99  # no channel stays where it was


def test_rotate_heads_by_hand() -> None:
    """Two heads of two channels: rows of each q/k/v head become Rᵀ·W (bias Rᵀ·b), proj columns W·R."""
    qkv, proj = nn.Linear(3, 12), nn.Linear(4, 2)
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # a quarter turn: (x, y) @ R = (y, -x)
    before_w, before_b, before_p = qkv.weight.detach().clone(), qkv.bias.detach().clone(), proj.weight.detach().clone()
    rotate_heads(qkv, proj, num_heads=2, rotation=rotation)
    swap = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10])
    sign = torch.tensor([1.0, -1.0] * 6)
    torch.testing.assert_close(qkv.weight, before_w[swap] * sign[:, None])
    torch.testing.assert_close(qkv.bias, before_b[swap] * sign)
    torch.testing.assert_close(proj.weight, before_p[:, swap[:4]] * sign[:4])
    rotate_heads(qkv, None, num_heads=2, rotation=rotation.T, query_key=False)  # neither part asked: no-op
    torch.testing.assert_close(qkv.weight, before_w[swap] * sign[:, None])


def rotated_copy(float_model: nn.Module, generator: torch.Generator) -> tuple[nn.Module, int]:
    """A prepared copy with every rotatable head turned by a random orthogonal matrix; returns it and their count."""
    model = prepare(copy.deepcopy(float_model), QuantConfig())
    attentions = rotatable_attentions(model)

    def random_rotation(head_dim: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64))[0]

    rotate_attention_heads(attentions, random_rotation)
    return model, len(attentions)


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "dinov2", "swin"])
def test_rotating_heads_by_any_orthogonal_matrix_leaves_the_model_unchanged(family: str) -> None:
    """(qR)(kR)ᵀ = q·kᵀ under Swin's position bias and shift mask too, and proj·R undoes attn·(vR)."""
    float_model = build_tiny(family)
    model, rotated = rotated_copy(float_model, torch.Generator().manual_seed(3))
    assert rotated == sum(1 for name, _ in model.named_modules() if name.endswith("attn"))
    name = "blocks.0.attn" if family != "swin" else "layers.0.blocks.0.attn"
    for part in (f"{name}.qkv", f"{name}.proj"):
        assert not torch.allclose(model.get_submodule(part).weight, float_model.get_submodule(part).weight)
    x = tiny_input(family, batch=3, seed=4)
    with torch.no_grad():
        assert relative_error(model(x), float_model(x)) < 1e-5


def test_heads_with_a_query_key_norm_rotate_their_values_only() -> None:
    """A per-channel q/k LayerNorm does not commute with a rotation: q and k rows must stay as they are."""
    name, kwargs, _ = FAMILIES["vit"]
    torch.manual_seed(0)
    float_model = with_random_norms(timm.create_model(name, pretrained=False, **kwargs, qk_norm=True).eval())
    model, rotated = rotated_copy(float_model, torch.Generator().manual_seed(3))
    assert rotated == 2
    qkv, float_qkv = model.blocks[0].attn.qkv.weight, float_model.blocks[0].attn.qkv.weight
    assert torch.equal(qkv[:96], float_qkv[:96]) and not torch.allclose(qkv[96:], float_qkv[96:])
    x = tiny_input("vit", batch=3, seed=4)
    with torch.no_grad():
        assert relative_error(model(x), float_model(x)) < 1e-5


def test_gated_heads_with_an_output_norm_are_not_rotated() -> None:
    """A gate or a norm after attn·v acts per channel, and q/k norms block the other half: nothing to rotate."""
    name, kwargs, _ = FAMILIES["vit"]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs, qk_norm=True, scale_attn_norm=True).eval()
    assert rotatable_attentions(prepare(model, QuantConfig())) == {}


def test_rotation_spreads_an_outlier_value_channel_over_its_head() -> None:
    """One value channel 30 above the rest: unrotated it sets proj's per-tensor input range; rotated by the
    32-channel Hadamard matrix it lands on every channel of the head at 1/√32 of its size."""
    name, kwargs, _ = FAMILIES["vit"]
    torch.manual_seed(0)
    float_model = timm.create_model(name, pretrained=False, **{**kwargs, "embed_dim": 64}).eval()
    with torch.no_grad():
        float_model.blocks[0].attn.qkv.bias[128] += 30.0  # value channel 0 of head 0
    calib = tiny_input("vit", 4)
    ranges = {}
    for rotate in (True, False):
        model = quantize(copy.deepcopy(float_model), QuantConfig(8, 8, rotate_heads=rotate), calib, progress=False)
        quantizer = model.blocks[0].attn.proj.input_quantizer
        ranges[rotate] = (quantizer.scale * 255).item()
    assert ranges[False] > 30.0
    assert ranges[True] < ranges[False] / 3, ranges


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
    config = QuantConfig(wbits=4, abits=4, clip_k=clip_k)
    model = quantize(copy.deepcopy(float_model), config, calib, progress=False)
    assert any(layer.weight_quantizer.rounding_offset.any() for layer in weighted_layers(model).values())  # GPTQ's
    norm_name = "blocks.0.norm1" if family == "vit" else "layers.0.blocks.0.norm2"
    assert not torch.equal(model.get_submodule(norm_name).weight, float_model.get_submodule(norm_name).weight)
    fc2_name = "blocks.0.mlp.fc2" if family == "vit" else "layers.0.blocks.0.mlp.fc2"
    fc2_reparam = model.get_submodule(fc2_name).input_reparam
    assert not torch.equal(fc2_reparam.r, torch.ones_like(fc2_reparam.r))
    assert not torch.equal(fc2_reparam.rotation.right, torch.eye(fc2_reparam.rotation.right.shape[0]))
    set_mode(model, QuantMode.OFF)
    with torch.no_grad():
        assert relative_error(model(check), float_model(check)) < 1e-5


# ------------------------------------------------------------------------------------------------ CRL grid


def norm_output(model: nn.Module, norm: str, x: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = model.get_submodule(norm).register_forward_hook(lambda _m, _a, out: captured.append(out.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return captured[0]


@pytest.mark.parametrize("clip_k", [1.0, None])
def test_crl_quantizer_uses_the_clipped_target_grid(clip_k: float | None) -> None:
    """The qkv input grid is the mean of the clipped channel grids, and outlier channels saturate on it."""
    float_model = build_tiny("vit")
    with torch.no_grad():
        norm = float_model.blocks[0].norm1
        norm.weight.fill_(1.0)
        norm.weight[[3, 17]] = 40.0  # two outlier channels, far beyond mean ± 1·std of the channel ranges
    calib = tiny_input("vit", batch=4, seed=3)
    config = QuantConfig(wbits=4, abits=4, clip_k=clip_k, gptq=False)
    model = quantize(copy.deepcopy(float_model), config, calib, progress=False)

    observer = UniformObserver("norm1", 4, config.percentiles, channel_dim=-1)
    observer.update(norm_output(float_model, "blocks.0.norm1", calib))
    channel_scale, channel_zero = observer.qparams()
    channel_scale, channel_zero = clip_to_mean_std(channel_scale, clip_k), clip_to_mean_std(channel_zero, clip_k)
    grid = model.blocks[0].attn.qkv.input_quantizer
    torch.testing.assert_close(grid.scale, channel_scale.mean(), rtol=1e-6, atol=0)
    assert grid.zero_point.item() == channel_zero.mean().round().item()

    set_mode(model, QuantMode.OFF)  # the sink quantizes its input in place: read the fold with it off
    folded = norm_output(model, "blocks.0.norm1", calib)
    grid_max = (15 - grid.zero_point) * grid.scale
    outliers_beyond = folded[..., [3, 17]].amax() > grid_max * 1.5
    assert bool(outliers_beyond) == (clip_k is not None)  # CRL leaves the outliers to be clipped by the grid


def test_refit_grid_is_widened_by_the_clipped_outliers() -> None:
    float_model = build_tiny("vit")
    with torch.no_grad():
        float_model.blocks[0].norm1.weight.fill_(1.0)
        float_model.blocks[0].norm1.weight[[3, 17]] = 40.0
    calib = tiny_input("vit", batch=4, seed=3)
    scales = {
        grid: quantize(
            copy.deepcopy(float_model),
            QuantConfig(4, 4, clip_k=1.0, gptq=False, folded_grid=grid),
            calib,
            progress=False,
        )
        .blocks[0]
        .attn.qkv.input_quantizer.scale.item()
        for grid in ("target", "refit")
    }
    assert scales["refit"] > 1.2 * scales["target"], scales
