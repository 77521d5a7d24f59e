"""Pure quantization maths on hand-made tensors: uniform grid, log√2 grid, its log2 form, percentiles.

The fast paths (in-place fake quant, fused affine, log-grid lookup) are checked against the formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_codes_equal_but_near_boundaries
from hypothesis import given, settings
from hypothesis import strategies as st

from lrpq.primitives import (
    dequantize_log2,
    dequantize_log_sqrt2,
    fake_quant_log2,
    fake_quant_log_sqrt2,
    fake_quant_uniform,
    log2_shift_form,
    percentile_bounds,
    quantize_log_sqrt2,
    quantize_uniform,
    uniform_qparams,
)

# ---------------------------------------------------------------------------------------------- uniform grid


def test_uniform_qparams_by_hand() -> None:
    # Range [-1, 2] over 2 bits (levels 0..3): scale = 3 / 3 = 1, zero sits at code 1.
    scale, zero_point = uniform_qparams(torch.tensor(-1.0), torch.tensor(2.0), 2)
    assert scale.item() == 1.0
    assert zero_point.item() == 1.0


def test_uniform_codes_and_values_by_hand() -> None:
    scale, zero_point = torch.tensor(1.0), torch.tensor(1.0)
    x = torch.tensor([-5.0, -1.6, -1.0, -0.4, 0.0, 0.6, 1.4, 2.0, 2.6, 100.0])
    # round(x / 1) + 1, clamped to [0, 3]: -5→0, -1.6→-1→0, -1→0, -0.4→1, 0→1, 0.6→2, 1.4→2, 2→3, 2.6→4→3, 100→3
    expected_codes = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0])
    expected_values = torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    assert torch.equal(quantize_uniform(x, scale, zero_point, 2), expected_codes)
    assert torch.equal(fake_quant_uniform(x, scale, zero_point, 2), expected_values)


def test_offsets_move_codes_by_whole_levels_within_the_grid() -> None:
    scale, zero_point = torch.tensor(0.5), torch.tensor(2.0)
    x = torch.tensor([-1.0, -0.2, 0.3, 0.4, 0.6])  # nearest codes 0, 2, 3, 3, 3
    offset = torch.tensor([-1, 1, -2, 0, 1], dtype=torch.int8)
    expected_codes = torch.tensor([0.0, 3.0, 1.0, 3.0, 3.0])  # 0-1 and 3+1 clamp to the 2-bit grid
    assert torch.equal(quantize_uniform(x, scale, zero_point, 2, offset=offset), expected_codes)
    expected_values = (expected_codes - zero_point) * scale
    assert torch.equal(fake_quant_uniform(x, scale, zero_point, 2, offset=offset), expected_values)


def test_uniform_rounds_half_to_even() -> None:
    # 0.5 and 1.5 are ties: round-half-to-even gives 0 and 2, so codes 1 and 3 (torch.round semantics).
    scale, zero_point = torch.tensor(1.0), torch.tensor(1.0)
    codes = quantize_uniform(torch.tensor([0.5, 1.5]), scale, zero_point, 2)
    assert codes.tolist() == [1.0, 3.0]


def test_uniform_range_is_widened_to_contain_zero() -> None:
    # [0.5, 3] becomes [0, 3]: 3 bits → 7 levels of 3/7, zero point 0; zero stays exactly zero.
    scale, zero_point = uniform_qparams(torch.tensor(0.5), torch.tensor(3.0), 3)
    assert scale.item() == pytest.approx(3.0 / 7.0, rel=1e-7)
    assert zero_point.item() == 0.0
    # [-4, -1] becomes [-4, 0]: zero point at the top code 7.
    scale, zero_point = uniform_qparams(torch.tensor(-4.0), torch.tensor(-1.0), 3)
    assert scale.item() == pytest.approx(4.0 / 7.0, rel=1e-7)
    assert zero_point.item() == 7.0
    assert fake_quant_uniform(torch.tensor(0.0), scale, zero_point, 3).item() == 0.0


@pytest.mark.parametrize("bits", range(2, 9))
def test_every_bit_width_from_2_to_8_spans_its_grid(bits: int) -> None:
    levels = 2**bits - 1
    x_min, x_max = torch.tensor(-1.0), torch.tensor(2.0)
    scale, zero_point = uniform_qparams(x_min, x_max, bits)
    assert scale.item() == pytest.approx(3.0 / levels, rel=1e-6)
    assert zero_point.item() == round(levels / 3.0)
    assert quantize_uniform(x_min, scale, zero_point, bits).item() == 0.0
    assert quantize_uniform(x_max, scale, zero_point, bits).item() == levels
    # Zero is a grid point for every width, and a dense sweep uses exactly 2^bits distinct values.
    assert fake_quant_uniform(torch.tensor(0.0), scale, zero_point, bits).item() == 0.0
    sweep = torch.linspace(-1.5, 2.5, 20_001)
    assert fake_quant_uniform(sweep, scale, zero_point, bits).unique().numel() == 2**bits


def test_uniform_per_channel_parameters_broadcast() -> None:
    # Two rows with their own ranges: [-1, 2] (scale 1, zp 1) and [0, 6] (scale 2, zp 0), 2 bits.
    scale, zero_point = uniform_qparams(torch.tensor([[-1.0], [0.0]]), torch.tensor([[2.0], [6.0]]), 2)
    assert scale.flatten().tolist() == [1.0, 2.0]
    assert zero_point.flatten().tolist() == [1.0, 0.0]
    x = torch.tensor([[-3.0, 0.4, 1.6, 9.0], [-3.0, 0.9, 3.2, 9.0]])
    expected = torch.tensor([[-1.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 6.0]])
    assert torch.equal(fake_quant_uniform(x, scale, zero_point, 2), expected)


@pytest.mark.parametrize("bits", range(2, 9))
def test_in_place_uniform_fake_quant_equals_the_textbook_formula(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    x = 3.0 * torch.randn(64, 33, generator=generator)
    for lower, upper in ((x.min(), x.max() * 0.5), (x.amin(1, keepdim=True) * 0.7, x.amax(1, keepdim=True))):
        scale, zero_point = uniform_qparams(lower, upper, bits)
        expected = (quantize_uniform(x, scale, zero_point, bits) - zero_point) * scale
        assert torch.equal(fake_quant_uniform(x, scale, zero_point, bits), expected)
        buffer = torch.empty_like(x)
        assert torch.equal(fake_quant_uniform(x, scale, zero_point, bits, out=buffer), expected)


@pytest.mark.parametrize("bits", [4, 8])
def test_affine_folded_into_fake_quant_equals_quantizing_the_mapped_tensor(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    x = 3.0 * torch.randn(200, 96, generator=generator)
    weight, bias = torch.rand(96, generator=generator) + 0.2, torch.randn(96, generator=generator)
    scale, zero_point = uniform_qparams(torch.tensor(-4.0), torch.tensor(5.0), bits)
    fused = fake_quant_uniform(x, scale, zero_point, bits, affine=(weight, bias))
    exact = (x.double() * weight.double() + bias.double()) / scale.double()
    assert_codes_equal_but_near_boundaries(fused, scale, exact)
    buffer = x.clone()
    assert torch.equal(fake_quant_uniform(buffer, scale, zero_point, bits, out=buffer, affine=(weight, bias)), fused)


# ---------------------------------------------------------------------------------------------- log√2 grid


def test_log_sqrt2_codes_and_values_by_hand() -> None:
    scale = torch.tensor(1.0)
    r2 = math.sqrt(2.0)
    # Levels of a 3-bit log√2 grid with scale 1: 2^(-q/2) for q = 0..7.
    x = torch.tensor([1.0, 1 / r2, 0.5, 0.25, 2.0**-3.5, 3.0, 2.0**-4, 1e-3, 0.0])
    codes, underflow = quantize_log_sqrt2(x, scale, 3)
    # 3.0 is above the scale: code 0 (value 1). 2^-4 is code 8 and 1e-3 code 20: past the last level.
    assert codes.tolist() == [0.0, 1.0, 2.0, 4.0, 7.0, 0.0, 7.0, 7.0, 7.0]
    assert underflow.tolist() == [False, False, False, False, False, False, True, True, True]
    expected = torch.tensor([1.0, 1 / r2, 0.5, 0.25, 2.0**-3.5, 1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(fake_quant_log_sqrt2(x, scale, 3), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(dequantize_log_sqrt2(codes, underflow, scale), expected, rtol=0, atol=1e-7)


def test_log_sqrt2_rounds_in_the_log_domain() -> None:
    # 0.6: -2·log2(0.6) = 1.474 → code 1 (1/√2 = 0.707); 0.3: 3.474 → code 3 (2^-1.5 = 0.354).
    values = fake_quant_log_sqrt2(torch.tensor([0.6, 0.3]), torch.tensor(1.0), 3)
    torch.testing.assert_close(values, torch.tensor([2.0**-0.5, 2.0**-1.5]), rtol=0, atol=1e-7)
    # With scale 0.5 every level halves.
    values = fake_quant_log_sqrt2(torch.tensor([0.5, 0.25, 0.0]), torch.tensor(0.5), 3)
    torch.testing.assert_close(values, torch.tensor([0.5, 0.25, 0.0]), rtol=0, atol=1e-7)


def test_log2_shift_and_parity_by_hand() -> None:
    codes = torch.tensor([0.0, 1.0, 2.0, 3.0, 6.0, 7.0])
    shift, parity = log2_shift_form(codes)
    assert shift.tolist() == [0.0, 1.0, 1.0, 2.0, 3.0, 4.0]
    assert parity.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    # Odd codes: 2^-ceil(q/2)·√2 = 2^(-q/2); even codes: 2^(-q/2) directly.
    values = dequantize_log2(shift, parity, torch.zeros(6, dtype=torch.bool), torch.tensor(1.0))
    torch.testing.assert_close(values, torch.exp2(-codes / 2), rtol=0, atol=1e-7)


@pytest.mark.parametrize("bits", range(3, 9))
def test_log2_form_equals_log_sqrt2_on_softmax_outputs(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    attn = (3.0 * torch.randn(4, 2, 17, 17, generator=generator)).softmax(dim=-1)
    attn[0, 0, 0, :3] = 0.0  # exact zeros (masked positions) too
    for scale in (attn.max(), torch.tensor(0.37)):
        reference = fake_quant_log_sqrt2(attn, scale, bits)
        torch.testing.assert_close(fake_quant_log2(attn, scale, bits), reference, rtol=0, atol=1e-7)
    codes, _ = quantize_log_sqrt2(attn, attn.max(), bits)
    shift, parity = log2_shift_form(codes)
    assert torch.equal(shift, shift.round())
    assert set(parity.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(codes, 2 * shift - parity)  # q = 2·ceil(q/2) - parity(q)


@pytest.mark.parametrize("bits", range(2, 9))
def test_log_grid_lookup_equals_the_elementwise_formulas(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    attn = (4.0 * torch.randn(3, 2, 29, 29, generator=generator)).softmax(dim=-1)
    attn[0, 0, 0, :4] = 0.0
    attn[0, 0, 1, :3] = torch.tensor([float("nan"), float("inf"), -0.5])  # as the formula: NaN, scale, 0
    for scale in (attn.nan_to_num().max(), torch.tensor(0.23), torch.tensor([[[[0.5]], [[0.9]]]])):
        codes, underflow = quantize_log_sqrt2(attn, scale, bits)
        shift, parity = log2_shift_form(codes)
        log2_reference = dequantize_log2(shift, parity, underflow, scale)
        log_sqrt2_reference = dequantize_log_sqrt2(codes, underflow, scale)
        exact = {"rtol": 0.0, "atol": 0.0, "equal_nan": True}
        torch.testing.assert_close(fake_quant_log2(attn, scale, bits), log2_reference, **exact)
        torch.testing.assert_close(fake_quant_log_sqrt2(attn, scale, bits), log_sqrt2_reference, **exact)


@pytest.mark.parametrize("bits", range(2, 9))
def test_log_grid_lookup_rounds_like_the_formula_next_to_every_level_boundary(bits: int) -> None:
    # Every float32 within 512 ulps of each rounding boundary 2^(-(q + 1/2) / 2) of the log√2 grid.
    boundaries = torch.exp2(-(torch.arange(2**bits, dtype=torch.float64) + 0.5) / 2).float()
    offsets = torch.arange(-512, 513, dtype=torch.int32)
    ratios = (boundaries.view(torch.int32).unsqueeze(1) + offsets).view(torch.float32).reshape(-1)
    unit = torch.tensor(1.0)
    codes, underflow = quantize_log_sqrt2(ratios, unit, bits)
    assert torch.equal(fake_quant_log_sqrt2(ratios, unit, bits), dequantize_log_sqrt2(codes, underflow, unit))
    shift, parity = log2_shift_form(codes)
    assert torch.equal(fake_quant_log2(ratios, unit, bits), dequantize_log2(shift, parity, underflow, unit))


# ---------------------------------------------------------------------------------------------- percentiles


def reference_bounds(
    x: torch.Tensor, percentiles: tuple[float, ...], channel_dim: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow reference: one ``torch.quantile`` call per percentile and per channel, in float64."""
    x = x.double()
    if channel_dim is None:
        rows = [x.reshape(-1)]
    else:
        rows = [x.select(channel_dim, c).reshape(-1) for c in range(x.shape[channel_dim])]
    lower = [[torch.quantile(row, 1.0 - p).item() for row in rows] for p in percentiles]
    upper = [[torch.quantile(row, p).item() for row in rows] for p in percentiles]
    lower_t = torch.tensor(lower, dtype=torch.float64)
    upper_t = torch.tensor(upper, dtype=torch.float64)
    if channel_dim is None:
        return lower_t[:, 0], upper_t[:, 0]
    return lower_t, upper_t


def assert_bounds_match(x: torch.Tensor, percentiles: tuple[float, ...], channel_dim: int | None) -> None:
    lower, upper = percentile_bounds(x, percentiles, channel_dim)
    ref_lower, ref_upper = reference_bounds(x, percentiles, channel_dim)
    torch.testing.assert_close(lower.double(), ref_lower, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(upper.double(), ref_upper, rtol=1e-5, atol=1e-5)


def test_percentile_bounds_by_hand() -> None:
    # 0..10: quantile p sits at position 10p; 0.95 → 9.5, 1.0 → 10; lower quantiles mirror them.
    x = torch.arange(11.0)[torch.randperm(11, generator=torch.Generator().manual_seed(0))]
    lower, upper = percentile_bounds(x, (0.95, 1.0))
    assert lower.tolist() == [0.5, 0.0]
    assert upper.tolist() == [9.5, 10.0]


@pytest.mark.parametrize("channel_dim", [None, 0, -1])
def test_percentile_bounds_match_torch_quantile(channel_dim: int | None) -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 50, 7, generator=generator) * torch.linspace(0.1, 5.0, 7)
    percentiles = (0.9, 0.99, 0.999, 0.9999, 1.0)
    assert_bounds_match(x, percentiles, channel_dim)


def test_percentile_bounds_per_channel_shapes() -> None:
    x = torch.randn(4, 10, 3)
    lower, upper = percentile_bounds(x, (0.99, 1.0), channel_dim=-1)
    assert lower.shape == upper.shape == (2, 3)
    lower, upper = percentile_bounds(x, (0.99, 1.0))
    assert lower.shape == upper.shape == (2,)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    percentiles=st.lists(st.floats(0.5, 1.0, exclude_min=True), min_size=1, max_size=4).map(tuple),
    channel_choice=st.sampled_from(["none", "first", "last"]),
    seed=st.integers(0, 2**16),
    integer_valued=st.booleans(),
)
def test_percentile_bounds_property(
    shape: list[int], percentiles: tuple[float, ...], channel_choice: str, seed: int, integer_valued: bool
) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3
    if integer_valued:  # many ties
        x = x.round()
    channel_dim = {"none": None, "first": 0, "last": -1}[channel_choice]
    assert_bounds_match(x, percentiles, channel_dim)
