"""Fake-quantizer modules: explicit OFF / OBSERVE / QUANT modes, the calibration context, state dicts."""

from __future__ import annotations

import math

import pytest
import torch

from lrpq.calibrate import calibration
from lrpq.observers import CalibrationError
from lrpq.quantizers import Log2Quantizer, LogSqrt2Quantizer, QuantMode, UniformQuantizer, WeightQuantizer

MINMAX = (1.0,)  # percentile 1.0 only: the observed range is exactly [min, max]


def test_new_quantizer_is_off_and_is_the_identity() -> None:
    quantizer = UniformQuantizer("q", 2, MINMAX)
    assert quantizer.mode is QuantMode.OFF
    x = torch.tensor([-7.3, 0.123, 5.5])
    assert torch.equal(quantizer(x), x)


def test_observe_is_the_identity_and_records() -> None:
    quantizer = UniformQuantizer("q", 2, MINMAX)
    quantizer.start_observing()
    assert quantizer.mode is QuantMode.OBSERVE
    x = torch.tensor([-1.0, 0.3, 2.0])
    assert torch.equal(quantizer(x), x)
    assert quantizer.observer is not None
    assert quantizer.observer.batches == 1
    # Parameters stay untouched until observing finishes.
    assert quantizer.scale.item() == 1.0
    assert quantizer.zero_point.item() == 0.0


def test_quant_applies_the_observed_grid() -> None:
    quantizer = UniformQuantizer("q", 2, MINMAX)
    quantizer.start_observing()
    quantizer(torch.tensor([-1.0, 0.3, 2.0]))
    quantizer.finish_observing()
    # Range [-1, 2] over 2 bits: scale 1, zero point 1, values {-1, 0, 1, 2}.
    assert quantizer.mode is QuantMode.QUANT
    assert quantizer.observer is None
    assert quantizer.scale.item() == 1.0
    assert quantizer.zero_point.item() == 1.0
    out = quantizer(torch.tensor([-1.6, -0.4, 0.6, 1.4, 2.6]))
    assert out.tolist() == [-1.0, 0.0, 1.0, 1.0, 2.0]
    quantizer.mode = QuantMode.OFF
    assert quantizer(torch.tensor([0.6])).tolist() == pytest.approx([0.6])


def test_observing_without_an_observer_is_an_error() -> None:
    quantizer = UniformQuantizer("blocks.0.attn.qkv.input", 4, MINMAX)
    quantizer.mode = QuantMode.OBSERVE
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn\.qkv\.input"):
        quantizer(torch.ones(3))


def test_per_channel_weight_calibration_by_hand() -> None:
    weight = torch.tensor([[-1.0, 0.0, 2.0], [0.0, 1.0, 3.0], [-6.0, -2.0, 0.0]])
    quantizer = UniformQuantizer("w", 2, MINMAX, channel_dim=0, param_shape=(3, 1))
    quantizer.calibrate_from(weight)
    # Rows: [-1, 2] → (1, 1); [0, 3] → (1, 0); [-6, 0] → (2, 3).
    assert quantizer.scale.flatten().tolist() == [1.0, 1.0, 2.0]
    assert quantizer.zero_point.flatten().tolist() == [1.0, 0.0, 3.0]
    assert quantizer.mode is QuantMode.QUANT
    # Every row's values are grid points of its own grid, so fake quantization reproduces them.
    assert torch.equal(quantizer(weight), weight)


def test_weight_quantizer_holds_a_chosen_rounding_and_stays_float_when_off() -> None:
    weight = torch.tensor([[-1.0, 0.4, 2.0], [0.0, 1.4, 3.0]])
    quantizer = WeightQuantizer("w", 2, MINMAX, weight, per_channel=True)
    quantizer.calibrate_from(weight)  # rows: scale 1, zero points 1 and 0; nearest levels 0.0 and 1.0
    rounded = torch.tensor([[-1.0, 1.0, 2.0], [0.0, 2.0, 3.0]])  # the middle weights one level up
    quantizer.hold_rounding(weight, rounded)
    assert quantizer.rounding_offset.tolist() == [[0, 1, 0], [0, 1, 0]]
    assert torch.equal(quantizer(weight), rounded)
    assert torch.equal(quantizer.codes(weight), torch.tensor([[0.0, 2.0, 3.0], [0.0, 2.0, 3.0]]))
    quantizer.mode = QuantMode.OFF
    assert torch.equal(quantizer(weight), weight)  # the float weight itself was never changed

    fresh = WeightQuantizer("w", 2, MINMAX, weight, per_channel=True)
    fresh.load_state_dict(quantizer.state_dict())  # the rounding travels with the state dict
    fresh.mode = QuantMode.QUANT
    assert torch.equal(fresh(weight), rounded)
    fresh.calibrate_from(weight)  # a new grid starts from nearest rounding again
    assert not fresh.rounding_offset.any()
    assert torch.equal(fresh(weight), torch.tensor([[-1.0, 0.0, 2.0], [0.0, 1.0, 3.0]]))


def test_weight_quantizer_per_tensor_has_one_grid() -> None:
    weight = torch.tensor([[-2.0, 0.0], [1.0, 4.0]])
    quantizer = WeightQuantizer("w", 2, MINMAX, weight, per_channel=False)
    quantizer.calibrate_from(weight)  # [-2, 4] on 3 steps: scale 2, zero point 1
    assert quantizer.scale.shape == quantizer.zero_point.shape == ()
    assert (quantizer.scale.item(), quantizer.zero_point.item()) == (2.0, 1.0)
    assert quantizer.rounding_offset.shape == weight.shape


def test_calibration_context_switches_to_quant_on_clean_exit() -> None:
    quantizers = [UniformQuantizer("a", 8, MINMAX), LogSqrt2Quantizer("b", 4, MINMAX)]
    with calibration(quantizers):
        assert all(q.mode is QuantMode.OBSERVE for q in quantizers)
        quantizers[0](torch.tensor([-2.0, 0.0, 1.0]))
        quantizers[1](torch.tensor([0.0, 0.25, 0.5]))
    assert all(q.mode is QuantMode.QUANT and q.observer is None for q in quantizers)
    assert quantizers[0].scale.item() == pytest.approx(3.0 / 255.0, rel=1e-6)
    assert quantizers[1].scale.item() == 0.5  # log√2 scale = the observed maximum


def test_calibration_context_goes_back_to_off_on_error() -> None:
    quantizers = [UniformQuantizer("a", 8, MINMAX), UniformQuantizer("b", 8, MINMAX)]
    with pytest.raises(ValueError, match="boom"), calibration(quantizers):
        quantizers[0](torch.tensor([-2.0, 0.0, 1.0]))
        raise ValueError("boom")
    assert all(q.mode is QuantMode.OFF and q.observer is None for q in quantizers)
    assert all(q.scale.item() == 1.0 and q.zero_point.item() == 0.0 for q in quantizers)


def test_calibration_error_inside_the_context_leaves_everything_off() -> None:
    quantizers = [UniformQuantizer("a", 8, MINMAX), UniformQuantizer("blocks.1.mlp.fc2.input", 8, MINMAX)]
    with pytest.raises(CalibrationError, match=r"blocks\.1\.mlp\.fc2\.input"), calibration(quantizers):
        quantizers[0](torch.tensor([1.0, 2.0]))
        quantizers[1](torch.tensor([1.0, math.nan]))
    assert all(q.mode is QuantMode.OFF and q.observer is None for q in quantizers)


def test_calibration_context_leaves_nothing_half_set_when_a_point_saw_no_data() -> None:
    quantizers = [UniformQuantizer("fed", 8, MINMAX), UniformQuantizer("starved", 8, MINMAX)]
    quantizers.append(UniformQuantizer("fed_too", 8, MINMAX))
    with pytest.raises(CalibrationError, match="'starved'"), calibration(quantizers):
        quantizers[0](torch.tensor([1.0, 2.0]))
        quantizers[2](torch.tensor([1.0, 2.0]))
    assert [q.mode for q in quantizers] == [QuantMode.OFF] * 3
    assert all(q.observer is None for q in quantizers)


def calibrated_log_quantizer(bits: int) -> tuple[LogSqrt2Quantizer, torch.Tensor]:
    generator = torch.Generator().manual_seed(bits)
    attn = (2.0 * torch.randn(2, 3, 9, 9, generator=generator)).softmax(dim=-1)
    quantizer = LogSqrt2Quantizer("blocks.0.attn.matmul2.a", bits, (0.99, 1.0))
    with calibration([quantizer]):
        quantizer(attn)
    return quantizer, (2.0 * torch.randn(4, 3, 9, 9, generator=generator)).softmax(dim=-1)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_to_log2_gives_identical_outputs(bits: int) -> None:
    quantizer, attn = calibrated_log_quantizer(bits)
    log2 = quantizer.to_log2()
    assert isinstance(log2, Log2Quantizer)
    assert (log2.name, log2.bits, log2.mode) == (quantizer.name, quantizer.bits, QuantMode.QUANT)
    assert torch.equal(log2.scale, quantizer.scale)
    torch.testing.assert_close(log2(attn), quantizer(attn), rtol=0, atol=1e-7)
    assert not torch.equal(quantizer(attn), attn)  # the grid is really applied


def test_log2_form_cannot_be_recalibrated() -> None:
    quantizer, _ = calibrated_log_quantizer(4)
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn\.matmul2\.a"):
        quantizer.to_log2().start_observing()


def test_state_dict_holds_the_parameters() -> None:
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    quantizer = UniformQuantizer("w", 4, MINMAX, channel_dim=0, param_shape=(4, 1))
    quantizer.calibrate_from(weight)
    state = quantizer.state_dict()
    assert set(state) == {"scale", "zero_point"}
    assert state["scale"].shape == state["zero_point"].shape == (4, 1)
    torch.testing.assert_close(state["scale"].flatten(), (weight.amax(1) - weight.amin(1)) / 15)

    fresh = UniformQuantizer("w", 4, MINMAX, channel_dim=0, param_shape=(4, 1))
    fresh.load_state_dict(state)
    fresh.mode = QuantMode.QUANT
    assert torch.equal(fresh(weight), quantizer(weight))

    log_quantizer, _ = calibrated_log_quantizer(4)
    assert set(log_quantizer.state_dict()) == {"scale"}
    assert set(log_quantizer.to_log2().state_dict()) == {"scale"}


@pytest.mark.parametrize(
    "make",
    [lambda: UniformQuantizer("x", 4, (1.0,)), lambda: LogSqrt2Quantizer("x", 4, (1.0,))],
    ids=["uniform", "log_sqrt2"],
)
def test_overwrite_quantizes_in_place_with_the_same_values(make) -> None:
    quantizer = make()
    x = torch.rand(4, 6, generator=torch.Generator().manual_seed(0))
    with calibration([quantizer]):
        quantizer(x)
    expected = quantizer(x.clone())
    own = x.clone()
    result = quantizer(own, overwrite=True)
    assert torch.equal(result, expected)
    assert result.data_ptr() == own.data_ptr()  # no fresh buffer
    kept = x.clone()
    assert torch.equal(quantizer(kept), expected) and torch.equal(kept, x)  # not owned: untouched


def test_overwrite_never_touches_inputs_that_need_gradients_or_are_not_quantized() -> None:
    quantizer = UniformQuantizer("x", 4, (1.0,))
    x = torch.linspace(-1, 1, 8)
    same = x.clone()
    assert quantizer(same, overwrite=True) is same and torch.equal(same, x)  # OFF: identity
    with calibration([quantizer]):
        quantizer(x)
    leaf = x.clone().requires_grad_()
    out = quantizer(leaf, overwrite=True)
    assert out.data_ptr() != leaf.data_ptr() and torch.equal(leaf.detach(), x)
