"""Quantized layers: named quantization points per architecture, float equivalence when OFF, extension hook."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import timm
import torch
from conftest import FAMILIES, assert_codes_equal_but_near_boundaries, build_tiny, tiny_input
from timm.layers import Attention
from torch import nn

import lrpq.modules
from lrpq.api import UnsupportedModelError, prepare, quant_layers, quantize, quantizers, set_mode
from lrpq.config import QuantConfig
from lrpq.modules import QuantMatMul, register_attention
from lrpq.quantizers import LogSqrt2Quantizer, QuantMode, UniformQuantizer

BLOCK_LAYERS = ("attn.qkv", "attn.matmul1", "attn.matmul2", "attn.proj", "mlp.fc1", "mlp.fc2")


def expected_layers(family: str) -> list[str]:
    """Quantized layer names derived from the tiny configs' depth, independently of lrpq."""
    kwargs = FAMILIES[family][1]
    if family == "swin":
        names = ["patch_embed.proj"]
        for stage, depth in enumerate(kwargs["depths"]):
            if stage > 0:
                names.append(f"layers.{stage}.downsample.reduction")
            names += [f"layers.{stage}.blocks.{i}.{layer}" for i in range(depth) for layer in BLOCK_LAYERS]
        return [*names, "head.fc"]
    names = ["patch_embed.proj"]
    names += [f"blocks.{i}.{layer}" for i in range(kwargs["depth"]) for layer in BLOCK_LAYERS]
    heads = ["head", "head_dist"] if family == "deit_distilled" else ["head"]
    return names + heads


def expected_points(layers: list[str]) -> set[str]:
    points = set()
    for layer in layers:
        suffixes = ("a", "b") if layer.endswith(("matmul1", "matmul2")) else ("input", "weight")
        points.update(f"{layer}.{suffix}" for suffix in suffixes)
    return points


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_quantization_point_has_its_stable_name(family: str) -> None:
    model = prepare(build_tiny(family), QuantConfig())
    layers = expected_layers(family)
    assert sorted(quant_layers(model)) == sorted(layers)
    points = quantizers(model)
    assert set(points) == expected_points(layers)
    # A point's name is its layer's module path plus its role, so names map back onto the module tree.
    for layer in layers:
        module = model.get_submodule(layer)
        if isinstance(module, QuantMatMul):
            assert points[f"{layer}.a"] is module.a_quantizer
            assert points[f"{layer}.b"] is module.b_quantizer
            assert isinstance(module.a_quantizer, LogSqrt2Quantizer if layer.endswith("matmul2") else UniformQuantizer)
        else:
            assert points[f"{layer}.input"] is module.input_quantizer
            assert points[f"{layer}.weight"] is module.weight_quantizer
    assert all(q.mode is QuantMode.OFF for q in points.values())


def test_prepare_keeps_the_timm_parameters() -> None:
    model = build_tiny("vit")
    qkv_weight, head_bias = model.blocks[1].attn.qkv.weight, model.head.bias
    prepare(model, QuantConfig())
    assert model.blocks[1].attn.qkv.weight is qkv_weight
    assert model.head.bias is head_bias
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in build_tiny("vit").parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prepared_model_with_quantizers_off_is_the_float_model(family: str) -> None:
    float_model = build_tiny(family)
    prepared = prepare(copy.deepcopy(float_model), QuantConfig())
    x = tiny_input(family)
    with torch.no_grad():
        expected, actual = float_model(x), prepared(x)
    assert expected.abs().max() > 1e-3  # the comparison is not between two near-zero outputs
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_dinov2_style_layer_scale_model_is_float_equivalent_with_init_values() -> None:
    name, kwargs, _ = FAMILIES["vit"]
    torch.manual_seed(0)
    float_model = timm.create_model(name, pretrained=False, init_values=0.5, **kwargs).eval()
    prepared = prepare(copy.deepcopy(float_model), QuantConfig())
    x = tiny_input("vit")
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), float_model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "make_model",
    [
        lambda: nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)),
        lambda: timm.create_model("resnet18", pretrained=False, num_classes=5),
    ],
    ids=["sequential", "resnet18"],
)
def test_model_without_supported_attention_is_rejected(make_model) -> None:
    with pytest.raises(UnsupportedModelError, match="no supported attention"):
        prepare(make_model(), QuantConfig())


class SubclassedAttention(Attention):
    """A subclass may change the forward, so it must not be treated as timm's Attention."""


def test_attention_subclasses_are_not_matched() -> None:
    model = nn.Sequential(SubclassedAttention(8, num_heads=2))
    with pytest.raises(UnsupportedModelError):
        prepare(model, QuantConfig())


class ToyAttention(nn.Module):
    """Single-head attention that timm does not know."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.scale = dim**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v)


class QuantToyAttention(nn.Module):
    def __init__(self, attn: ToyAttention, name: str, config: QuantConfig) -> None:
        super().__init__()
        self.qkv, self.proj, self.scale = attn.qkv, attn.proj, attn.scale
        self.matmul1 = QuantMatMul(f"{name}.matmul1", config.bits_for(f"{name}.matmul1").abits, config.percentiles)
        self.matmul2 = QuantMatMul(
            f"{name}.matmul2", config.bits_for(f"{name}.matmul2").abits, config.percentiles, log_a=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(self.matmul2(self.matmul1(q * self.scale, k.transpose(-2, -1)).softmax(dim=-1), v))


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(embed=nn.Linear(4, 8), attn=ToyAttention(8), head=nn.Linear(8, 3))).eval()


def test_register_attention_teaches_lrpq_a_new_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lrpq.modules, "_ATTENTION_FACTORIES", dict(lrpq.modules._ATTENTION_FACTORIES))
    with pytest.raises(UnsupportedModelError):
        prepare(toy_model(), QuantConfig())

    register_attention(ToyAttention, QuantToyAttention)
    float_model = toy_model()
    prepared = prepare(copy.deepcopy(float_model), QuantConfig(wbits=8, abits=8))
    assert isinstance(prepared.attn, QuantToyAttention)
    assert sorted(quant_layers(prepared)) == sorted(
        ["embed", "attn.qkv", "attn.matmul1", "attn.matmul2", "attn.proj", "head"]
    )
    x = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), float_model(x), rtol=0, atol=1e-6)

    quantized = quantize(copy.deepcopy(float_model), QuantConfig(wbits=8, abits=8), x, progress=False)
    assert all(q.mode is QuantMode.QUANT for q in quantizers(quantized).values())
    with torch.no_grad():
        out, ref = quantized(x), float_model(x)
    assert not torch.equal(out, ref)
    assert (out - ref).norm() < 0.1 * ref.norm()


def test_key_channels_are_the_middle_third_of_qkv_unless_keys_are_normalised() -> None:
    config = QuantConfig()
    plain = lrpq.modules.QuantAttention(Attention(48, num_heads=2), "attn", config)
    assert plain.key_channels == slice(48, 96)
    normed = lrpq.modules.QuantAttention(
        Attention(48, num_heads=2, qk_norm=True, norm_layer=nn.LayerNorm), "attn", config
    )
    assert normed.key_channels is None  # a shift before LayerNorm(k) would not reach q·kᵀ unchanged
    window = build_tiny("swin").layers[0].blocks[0].attn
    assert lrpq.modules.QuantWindowAttention(window, "attn", config).key_channels == slice(24, 48)


def _quantized_tiny_vit(batch: int = 5) -> tuple[nn.Module, torch.Tensor]:
    model, x = build_tiny("vit"), tiny_input("vit", batch=batch)
    quantize(model, QuantConfig(wbits=4, abits=4), x, progress=False)
    return model, x


def test_frozen_attention_by_a_few_images_at_a_time_equals_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _quantized_tiny_vit()
    calls = []
    by_images = lrpq.modules.QuantAttention._attention_by_images
    monkeypatch.setattr(
        lrpq.modules.QuantAttention, "_attention_by_images", lambda self, *qkv: calls.append(1) or by_images(self, *qkv)
    )
    attention = next(m for m in model.modules() if isinstance(m, lrpq.modules.QuantAttention))
    per_image = attention.num_heads * (x.shape[-1] // 16) ** 2 * 2  # under two images' scores per piece
    monkeypatch.setattr(lrpq.modules, "_ATTENTION_PIECE", per_image)
    with torch.inference_mode():
        pieces = model(x)
        assert calls, "the frozen model did not take the by-images path"
        monkeypatch.setattr(lrpq.modules.QuantAttention, "_splits_by_images_exactly", lambda self, q: False)
        whole = model(x)
    assert torch.equal(pieces, whole)


def test_attention_stays_whole_while_hooked_recorded_or_observed() -> None:
    model, _ = _quantized_tiny_vit()
    attention = next(m for m in model.modules() if isinstance(m, lrpq.modules.QuantAttention))
    q = torch.zeros(1, 1, 1, 1)
    assert attention._splits_by_images_exactly(q)
    attention.attn_drop.train()
    assert not attention._splits_by_images_exactly(q)  # dropout would draw per piece
    attention.attn_drop.eval()
    handle = attention.matmul2.a_quantizer.register_forward_pre_hook(lambda *_: None)
    assert not attention._splits_by_images_exactly(q)
    handle.remove()
    assert not attention._splits_by_images_exactly(q.requires_grad_())
    attention.matmul1.b_quantizer.mode = QuantMode.OBSERVE
    assert not attention._splits_by_images_exactly(q.detach())


def quantized_vit() -> tuple[torch.nn.Module, torch.Tensor]:
    model = quantize(build_tiny("vit"), QuantConfig(wbits=4, abits=4), tiny_input("vit", batch=4), progress=False)
    return model, tiny_input("vit", batch=2, seed=3)


def uncached(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # the weight cache serves inference mode only
        return model(x)


def test_weight_cache_follows_weights_parameters_and_mode() -> None:
    model, x = quantized_vit()
    layer = model.blocks[0].mlp.fc1
    with torch.inference_mode():
        assert torch.equal(model(x), uncached(model, x))
        cached = layer._weight_cache._value
        model(x)
        assert layer._weight_cache._value is cached  # reused, not recomputed
    with torch.no_grad():
        layer.weight.mul_(1.5)
    with torch.inference_mode():
        assert torch.equal(model(x), uncached(model, x))
    scale, zero_point = layer.weight_quantizer.scale * 2, layer.weight_quantizer.zero_point
    layer.weight_quantizer.set_qparams(scale, zero_point)
    with torch.inference_mode():
        assert torch.equal(model(x), uncached(model, x))
        set_mode(model, QuantMode.OFF)
        assert torch.equal(model(x), uncached(model, x))
    assert not any("cache" in key for key in model.state_dict())


def test_weight_cache_never_reaches_autograd() -> None:
    model, x = quantized_vit()
    with torch.inference_mode():
        model(x)
    x = x.clone().requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("owned", [True, False])
def test_fused_rotation_fold_and_quantizer_of_fc2_equal_the_float64_reference(owned: bool) -> None:
    model = quantize(build_tiny("vit"), QuantConfig(wbits=4, abits=4), tiny_input("vit", batch=4), progress=False)
    fc2 = model.blocks[1].mlp.fc2
    reparam, quantizer = fc2.input_reparam, fc2.input_quantizer
    hidden = torch.nn.functional.gelu(3.0 * torch.randn(5, 17, 192, generator=torch.Generator().manual_seed(7)))
    rotation = torch.kron(reparam.rotation.left.double(), reparam.rotation.right.double())
    exact = ((hidden.double() @ rotation) / reparam.r.double() - reparam.b.double()) / quantizer.scale.double()
    fc2.input_owned = owned
    given = hidden.clone()
    with torch.inference_mode():
        quantized = fc2._quantized_reparam_input(given)
    assert (quantized.data_ptr() == given.data_ptr()) == owned  # written over the input only when it owns it
    assert_codes_equal_but_near_boundaries(quantized, quantizer.scale, exact)
