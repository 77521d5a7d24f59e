"""GPTQ rounding: on the grid, equal to nearest rounding when inputs are uncorrelated, better otherwise.

The fast sweep (float32, transposed, lazy updates every 32 columns) is held against the textbook
float64 sweep below, the implementation it replaced.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, reference_layer_inputs, tiny_input

from lrpq.api import quantize
from lrpq.config import QuantConfig
from lrpq.errors import LrpqError
from lrpq.gptq import (
    DAMPING,
    RANGE_SHRINKS,
    SecondMoment,
    StreamingRounding,
    gptq_round,
    input_weighted_range,
    inverse_cholesky,
)
from lrpq.primitives import fake_quant_uniform, uniform_qparams
from lrpq.quantizers import UniformQuantizer, WeightQuantizer


def weight_grid(weight: torch.Tensor, bits: int) -> UniformQuantizer:
    quantizer = UniformQuantizer("w", bits, (1.0,), channel_dim=0, param_shape=(weight.shape[0], 1))
    quantizer.calibrate_from(weight)
    return quantizer


def correlated_inputs(rows: int, features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator)
    return torch.randn(rows, features, generator=generator) @ mixing


def second_moment(x: torch.Tensor) -> torch.Tensor:
    moment = SecondMoment(x.shape[-1])
    for part in x.split(100):  # accumulated batch by batch, as calibration does
        moment.update(part)
    assert moment.rows == len(x)
    return moment.matrix


def reference_gptq_round(
    weight: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """GPTQ as first written here: float64 throughout, column by column, lazy updates every 128 columns."""
    work, h = weight.double().clone(), h.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(DAMPING * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scale, zero_point = scale.double(), zero_point.double()
    rounded = torch.empty_like(work)
    for start in range(0, work.shape[1], 128):
        stop = min(start + 128, work.shape[1])
        block, u_block = work[:, start:stop], u[start:stop, start:stop]
        errors = torch.empty_like(block)
        for i in range(stop - start):
            column = block[:, i : i + 1]
            quantized = fake_quant_uniform(column, scale, zero_point, bits)
            rounded[:, start + i : start + i + 1] = quantized
            error = (column - quantized) / u_block[i, i]
            block[:, i:].sub_(error * u_block[i : i + 1, i:])
            errors[:, i : i + 1] = error
        work[:, stop:].sub_(errors @ u[start:stop, stop:])
    return rounded.float()


def test_second_moment_accumulates_x_transpose_x() -> None:
    x = torch.randn(2, 150, 6, generator=torch.Generator().manual_seed(0))
    flat = x.reshape(-1, 6).double()
    # Each batch's product is taken in float32 (the inputs' precision), the running sum in float64.
    torch.testing.assert_close(second_moment(x.reshape(-1, 6)), flat.T @ flat, rtol=1e-6, atol=1e-5)
    assert second_moment(x.reshape(-1, 6)).dtype == torch.float64


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse() -> None:
    h = second_moment(correlated_inputs(500, 48, 8))
    u = inverse_cholesky(h.clone())
    damped = h + DAMPING * h.diagonal().mean() * torch.eye(48, dtype=torch.float64)
    assert torch.equal(u, u.triu()) and (u.diagonal() > 0).all()
    torch.testing.assert_close(u.T @ u @ damped, torch.eye(48, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize(("out_features", "in_features", "bits"), [(96, 200, 4), (40, 300, 3), (64, 72, 8)])
def test_fast_sweep_rounds_as_the_float64_reference(out_features: int, in_features: int, bits: int) -> None:
    """Same level for all but a negligible fraction of weights, and no larger output error."""
    seed = out_features + in_features + bits
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    x = correlated_inputs(3000, in_features, seed)
    h = second_moment(x)
    grid = weight_grid(weight, bits)
    fast = gptq_round(weight, h, grid.scale, grid.zero_point, bits)
    reference = reference_gptq_round(weight, h, grid.scale, grid.zero_point, bits)
    assert fast.dtype == weight.dtype
    assert (fast != reference).float().mean() <= 1e-3

    def output_error(w: torch.Tensor) -> float:
        return (x.double() @ (w - weight).double().T).square().sum().item()

    assert output_error(fast) <= output_error(reference) * (1 + 1e-4)


def test_rounded_weights_lie_on_the_quantizer_grid() -> None:
    weight = torch.randn(8, 40, generator=torch.Generator().manual_seed(1))
    grid = weight_grid(weight, 3)
    rounded = gptq_round(weight, second_moment(correlated_inputs(400, 40, 2)), grid.scale, grid.zero_point, 3)
    assert torch.equal(fake_quant_uniform(rounded, grid.scale, grid.zero_point, 3), rounded)
    assert not torch.equal(rounded, grid(weight))  # correlated inputs move some weights to another level


def test_uncorrelated_inputs_give_nearest_rounding() -> None:
    """With H = c·I no column's error says anything about another's, so nothing is carried over."""
    weight = torch.randn(6, 300, generator=torch.Generator().manual_seed(3))
    grid = weight_grid(weight, 4)
    identity = torch.eye(300, dtype=torch.float64) * 7.0
    assert torch.equal(gptq_round(weight, identity, grid.scale, grid.zero_point, 4), grid(weight))


def test_correlated_inputs_get_a_smaller_output_error_than_nearest_rounding() -> None:
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    x = correlated_inputs(2000, 64, 5)
    grid = weight_grid(weight, 3)
    rounded = gptq_round(weight, second_moment(x[:1000]), grid.scale, grid.zero_point, 3)
    held_out = x[1000:]

    def output_error(w: torch.Tensor) -> float:
        return (held_out @ w.T - held_out @ weight.T).square().sum().item()

    assert output_error(rounded) < 0.7 * output_error(grid(weight))


def test_dead_input_channels_are_rounded_to_nearest() -> None:
    weight = torch.randn(4, 10, generator=torch.Generator().manual_seed(6))
    x = correlated_inputs(200, 10, 7)
    x[:, 3] = 0.0
    grid = weight_grid(weight, 3)
    h = second_moment(x)
    h[3, :] = h[:, 3] = 0.0  # the channel never fired
    rounded = gptq_round(weight, h, grid.scale, grid.zero_point, 3)
    assert torch.isfinite(rounded).all()
    assert torch.equal(rounded[:, 3], grid(weight)[:, 3])  # nothing flows into or out of it


def test_streaming_rounding_rounds_once_the_last_batch_is_in_and_frees_its_matrix() -> None:
    weight = torch.randn(12, 40, generator=torch.Generator().manual_seed(9))
    grid = WeightQuantizer("w", 4, (1.0,), weight, per_channel=True)
    grid.calibrate_from(weight)
    parts = correlated_inputs(600, 40, 10).split(200)
    rounding = StreamingRounding("w", weight, grid, batches=3)
    moment = SecondMoment(40)
    for part in parts[:2]:
        rounding.update(part)
        moment.update(part)
        assert rounding.offsets is None
    rounding.update(parts[2])
    moment.update(parts[2])
    assert rounding.moment is None  # freed at the last batch
    expected = grid.rounding_offsets(weight, gptq_round(weight, moment.matrix, grid.scale, grid.zero_point, 4))
    assert torch.equal(rounding.finish(), expected) and expected.abs().sum() > 0
    with pytest.raises(LrpqError, match="more than once per calibration batch"):
        rounding.update(parts[0])


def test_streaming_rounding_of_a_layer_no_batch_reached_keeps_nearest_rounding() -> None:
    weight = torch.randn(4, 8)
    assert StreamingRounding("w", weight, weight_grid(weight, 4), batches=2).finish() is None


def output_errors_by_shrink(weight: torch.Tensor, h: torch.Tensor, bits: int) -> torch.Tensor:
    """(shrinks, rows): each row's nearest-rounding output error e·H·eᵀ on every shrunk min-max grid, in float64."""
    errors = []
    for shrink in RANGE_SHRINKS:
        scale, zero_point = uniform_qparams(weight.min(1).values * shrink, weight.max(1).values * shrink, bits)
        error = (fake_quant_uniform(weight, scale[:, None], zero_point[:, None], bits) - weight).double()
        errors.append(torch.einsum("ri,ij,rj->r", error, h.double(), error))
    return torch.stack(errors)


def test_input_weighted_range_is_each_rows_least_output_error_shrink() -> None:
    weight = torch.randn(16, 48, generator=torch.Generator().manual_seed(11))
    h = second_moment(correlated_inputs(400, 48, 12))
    scale, zero_point = input_weighted_range(weight, h, 3)
    best = output_errors_by_shrink(weight, h, 3).argmin(0)
    shrinks = torch.tensor(RANGE_SHRINKS)[best]
    expected_scale, expected_zero = uniform_qparams(weight.min(1).values * shrinks, weight.max(1).values * shrinks, 3)
    assert torch.allclose(scale.squeeze(1), expected_scale, rtol=1e-6) and torch.equal(
        zero_point.squeeze(1), expected_zero
    )
    assert (best > 0).any()  # at 3 bits some rows of a Gaussian weight are best clipped


def test_input_weighted_range_clips_an_outlier_whose_input_is_silent_and_keeps_one_that_is_loud() -> None:
    weight = torch.full((2, 8), 0.0)
    weight[:, 1:] = torch.linspace(-1.0, 1.0, 7)
    weight[:, 0] = 4.0  # an outlier in column 0 of both rows
    silent, loud = torch.eye(8), torch.eye(8)
    silent[0, 0], loud[0, 0] = 1e-6, 1e3
    silent_scale, silent_zero = input_weighted_range(weight, silent, 3)
    loud_scale, loud_zero = input_weighted_range(weight, loud, 3)
    assert torch.all(silent_scale < loud_scale)

    def outlier_error(scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        return (fake_quant_uniform(weight, scale, zero_point, 3) - weight)[:, 0].abs()

    assert torch.all(outlier_error(silent_scale, silent_zero) > loud_scale.squeeze(1))  # clipped by over a step
    assert torch.all(outlier_error(loud_scale, loud_zero) <= loud_scale.squeeze(1) / 2)  # on the grid


def test_streaming_rounding_chooses_its_grid_from_the_inputs_before_rounding() -> None:
    weight = torch.randn(12, 40, generator=torch.Generator().manual_seed(13))
    grid = WeightQuantizer("w", 3, (1.0,), weight, per_channel=True)
    grid.calibrate_from(weight)
    x = correlated_inputs(300, 40, 14)
    rounding = StreamingRounding("w", weight, grid, batches=1, choose_range=True)
    rounding.update(x)
    scale, zero_point = input_weighted_range(weight, second_moment(x), 3)
    assert torch.equal(grid.scale, scale) and torch.equal(grid.zero_point, zero_point)
    expected = grid.rounding_offsets(weight, gptq_round(weight, second_moment(x), scale, zero_point, 3))
    assert torch.equal(rounding.finish(), expected)


def test_quantize_with_gptq_lowers_the_logit_error_at_w4() -> None:
    float_model = build_tiny("vit")
    calib, held_out = tiny_input("vit", 16, seed=1), tiny_input("vit", 16, seed=2)

    def logit_error(config: QuantConfig) -> float:
        model = quantize(copy.deepcopy(float_model), config, calib, progress=False)
        with torch.no_grad():
            return (model(held_out) - float_model(held_out)).square().sum().item()

    # Measured 0.011 against 0.044. (At 3 bits this random model's layers still each gain, but their
    # errors compound worse end to end; GPTQ optimises each layer's output, not the model's.) fc2's
    # inputs are left unrotated: on this random model the rotation alone takes nearest rounding to
    # 0.018, which GPTQ then matches, so with it the comparison would no longer be about the rounding.
    nearest = logit_error(QuantConfig(wbits=4, abits=8, gptq=False, rotate_hidden=False))
    assert logit_error(QuantConfig(wbits=4, abits=8, rotate_hidden=False)) < 0.5 * nearest


@pytest.mark.shared
def test_reference_dinov2_3_bit_layers_gain_from_input_weighted_ranges(shared_dir: Path) -> None:
    """On ref-B's own layers (blocks 0, 6 and 11; weights at 3 bits, GPTQ from 8 calibration images), the
    input-weighted ranges must lower every layer's output error on held-out dev images, and their sum.

    Measured: 18–57 % less per layer (fc2 most), 40 % less in sum, the same to three digits with AVX2 and
    AVX-512 kernels. The whole model's logit SNR is no floor at 3 bits: GPTQ's error feedback makes the
    min-max model's SNR on 8 dev images vary from 0.9 to 3.1 dB between two machines' kernels
    (docs/findings.md).
    """
    kinds = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    layers = [f"blocks.{block}.{kind}" for block in (0, 6, 11) for kind in kinds]
    model, calib, dev = reference_layer_inputs(shared_dir, "vits14_imagenette", "imagenette", 8, 75, layers)
    modules = dict(model.named_modules())
    relative_errors: dict[str, list[float]] = {"min-max": [], "inputs": []}
    for name in layers:
        weight, h = modules[name].weight.detach(), second_moment(calib[name])
        minmax = uniform_qparams(weight.min(1).values, weight.max(1).values, 3)
        grids = {"min-max": tuple(t[:, None] for t in minmax), "inputs": input_weighted_range(weight, h, 3)}
        power = (dev[name] @ weight.T).square().sum()
        for key, (scale, zero_point) in grids.items():
            error = dev[name] @ (gptq_round(weight, h, scale, zero_point, 3) - weight).T
            relative_errors[key].append((error.square().sum() / power).item())
    ratios = [a / b for a, b in zip(relative_errors["inputs"], relative_errors["min-max"], strict=True)]
    assert max(ratios) < 0.9, dict(zip(layers, ratios, strict=True))  # measured at most 0.82
    assert sum(relative_errors["inputs"]) < 0.75 * sum(relative_errors["min-max"]), relative_errors  # measured 0.60
