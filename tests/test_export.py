"""Packed export: bit layout, bit-exact round trip of quantized tiny models, file size; fast percentiles."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import build_tiny, tiny_input
from safetensors.torch import save_file
from torch import nn

from lrpq.api import convert, prepare, quantize, set_mode
from lrpq.config import DEFAULT_PERCENTILES, QuantConfig
from lrpq.export import ExportError, load_packed_state, pack_codes, save_packed, unpack_codes
from lrpq.primitives import percentile_bounds
from lrpq.quantizers import QuantMode


def test_bit_layout_by_hand() -> None:
    # 4 bits: two codes per byte, first code in the high nibble; an odd count pads the last byte with 0.
    assert pack_codes(torch.tensor([1, 2, 15, 0, 9]), 4).tolist() == [0x12, 0xF0, 0x90]
    # 3 bits: 101 011 111 → 10101111 1·······, a dense stream with no 4-bit container.
    assert pack_codes(torch.tensor([5, 3, 7]), 3).tolist() == [0b10101111, 0b10000000]
    assert pack_codes(torch.tensor([200, 7]), 8).tolist() == [200, 7]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 9, 1001])
def test_pack_unpack_round_trip(bits: int, count: int) -> None:
    codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits * count))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-count * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, count).long(), codes)


def rebuilt(family: str, config: QuantConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """The fake-quant model rebuilt without data, from other random weights, as a run is loaded."""
    model = convert(prepare(build_tiny(family, seed=123), config))
    model.load_state_dict(state, strict=True)
    set_mode(model, QuantMode.QUANT)
    return model


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize(("bits", "gptq"), [(3, False), (4, False), (5, False), (6, False), (8, False), (4, True)])
def test_packed_export_round_trips_bit_exactly(tmp_path: Path, family: str, bits: int, gptq: bool) -> None:
    config = QuantConfig(wbits=bits, abits=bits, gptq=gptq)
    model = quantize(build_tiny(family), config, tiny_input(family, batch=4), progress=False)
    path = save_packed(model, tmp_path / "model.packed.safetensors")
    state = load_packed_state(path)
    original = model.state_dict()
    assert state.keys() == original.keys()
    packed_weights = {key for key in original if key.endswith(".weight") and f"{key}_quantizer.scale" in original}
    assert packed_weights, "the model should have quantized weights to pack"
    offsets = {f"{key}_quantizer.rounding_offset" for key in packed_weights}
    assert gptq == any(original[key].any() for key in offsets)  # GPTQ moved some weights off the nearest level
    for key in offsets:
        assert not state[key].any(), key  # the packed codes hold the rounding: a loaded weight is its own level
    for key in original.keys() - packed_weights - offsets:
        assert torch.equal(state[key], original[key]), key  # everything else is stored as it was

    loaded = rebuilt(family, config, state)
    x = tiny_input(family, batch=3, seed=7)
    with torch.inference_mode():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_loading_into_a_model_that_already_ran_uses_the_new_weights(tmp_path: Path) -> None:
    # The fake-quant weight cache of the target model is filled before loading and must not be reused.
    config = QuantConfig(wbits=4, abits=4)
    model = quantize(build_tiny("vit"), config, tiny_input("vit", batch=4), progress=False)
    target = quantize(build_tiny("vit", seed=5), config, tiny_input("vit", batch=4), progress=False)
    x = tiny_input("vit", batch=2, seed=9)
    with torch.inference_mode():
        before = target(x)
        target.load_state_dict(load_packed_state(save_packed(model, tmp_path / "m.safetensors")))
        after = target(x)
        assert not torch.equal(after, before)
        assert torch.equal(after, model(x))


def file_size(model: nn.Module, path: Path) -> int:
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return path.stat().st_size


def test_packed_file_size_follows_the_bit_width(tmp_path: Path) -> None:
    # Wide enough (192 inputs per weight row) that the per-channel scale, zero point and bias are small.
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 192, "num_heads": 3, "num_classes": 10}
    torch.manual_seed(0)
    float_size = file_size(timm.create_model("vit_tiny_patch16_224", **kwargs).eval(), tmp_path / "float.safetensors")
    sizes = {}
    for bits in (3, 4, 5, 8):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
        quantize(model, QuantConfig(wbits=bits, abits=bits), torch.randn(2, 3, 32, 32), progress=False)
        sizes[bits] = save_packed(model, tmp_path / f"w{bits}.safetensors").stat().st_size / float_size
    assert sizes[4] < 0.2
    assert sizes[3] < sizes[4] < sizes[5] < sizes[8] < 0.3  # a dense bitstream: 3 and 5 bits are not rounded up


def test_a_plain_safetensors_file_is_not_a_packed_model(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(ExportError, match="not a packed lrpq model"):
        load_packed_state(path)


def quantile_reference(x: torch.Tensor, percentiles: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.double().reshape(-1)
    q = torch.tensor(percentiles, dtype=torch.float64)
    return torch.quantile(flat, 1.0 - q), torch.quantile(flat, q)


@pytest.mark.parametrize("case", ["gaussian", "outliers_in_two_tokens", "integer_ties"])
def test_fast_percentile_path_matches_torch_quantile(case: str) -> None:
    # 4×197×384 values: long enough that percentile_bounds splits the row into pieces. Outliers packed
    # into two tokens overflow the per-piece share and exercise the recomputation of those pieces.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 197, 384, generator=generator)
    if case == "outliers_in_two_tokens":
        x[1, 5:7] *= 40.0
    elif case == "integer_ties":
        x = torch.randint(-6, 7, x.shape, generator=generator).float()
    percentiles = DEFAULT_PERCENTILES
    lower, upper = percentile_bounds(x, percentiles)
    ref_lower, ref_upper = quantile_reference(x, percentiles)
    torch.testing.assert_close(lower.double(), ref_lower, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(upper.double(), ref_upper, rtol=1e-6, atol=1e-6)
