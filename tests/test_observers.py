"""Observers: percentile choice by reconstruction error, multi-batch averaging, bad-data errors.

The brute-force reference below is written from the documented conventions in float64 numpy
(``np.quantile``, asymmetric grid widened to contain zero, round-half-to-even), independently of
``lrpq.primitives``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lrpq.observers import CalibrationError, ChannelRange, LogSqrt2Observer, UniformObserver

PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)


def brute_force_uniform_errors(x: np.ndarray, percentiles: tuple[float, ...], bits: int) -> list[float]:
    """Squared error of quantizing ``x`` with the range [quantile(1-p), quantile(p)], for every p."""
    levels = 2**bits - 1
    errors = []
    for p in percentiles:
        low = min(float(np.quantile(x, 1.0 - p)), 0.0)
        high = max(float(np.quantile(x, p)), 0.0)
        scale = (high - low) / levels
        zero_point = round(-low / scale)
        codes = np.clip(np.round(x / scale) + zero_point, 0, levels)
        errors.append(float(np.sum(((codes - zero_point) * scale - x) ** 2)))
    return errors


def brute_force_log_errors(x: np.ndarray, percentiles: tuple[float, ...], bits: int) -> list[float]:
    """Squared error of the log√2 grid ``s·2^(-q/2)`` with ``s = quantile(p)``, for every p."""
    errors = []
    for p in percentiles:
        scale = float(np.quantile(x, p))
        values = []
        for v in x.reshape(-1):
            q = math.inf if v == 0 else round(-2.0 * math.log2(min(v / scale, 1.0)))
            values.append(0.0 if q >= 2**bits else scale * 2.0 ** (-q / 2))
        errors.append(float(np.sum((np.array(values) - x.reshape(-1)) ** 2)))
    return errors


def clear_winner(errors: list[float]) -> int:
    """Index of the least error, after checking it is not a near-tie (so float32 cannot flip it)."""
    order = sorted(range(len(errors)), key=errors.__getitem__)
    assert errors[order[1]] > 1.001 * errors[order[0]], f"near-tie in the reference errors {errors}"
    return order[0]


def test_outliers_pick_a_clipping_percentile() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=generator)
    x[:10] = 50.0  # a few huge outliers: keeping them costs every other value its resolution
    observer = UniformObserver("point", 4, PERCENTILES, channel_dim=None)
    observer.update(x)
    lower, upper = observer.best_bounds()

    x64 = x.double().numpy()
    best = clear_winner(brute_force_uniform_errors(x64, PERCENTILES, 4))
    assert PERCENTILES[best] < 1.0
    assert lower.item() == pytest.approx(np.quantile(x64, 1 - PERCENTILES[best]), rel=1e-5, abs=1e-5)
    assert upper.item() == pytest.approx(np.quantile(x64, PERCENTILES[best]), rel=1e-5, abs=1e-5)
    assert upper.item() < 50.0


def test_uniform_tensor_picks_the_least_error_range() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(20_000, generator=generator) * 4.0 - 1.0  # U(-1, 3): no outliers
    percentiles = (0.9, 0.99, 0.999, 1.0)
    observer = UniformObserver("point", 4, percentiles, channel_dim=None)
    observer.update(x)
    lower, upper = observer.best_bounds()

    x64 = x.double().numpy()
    best = clear_winner(brute_force_uniform_errors(x64, percentiles, 4))
    assert lower.item() == pytest.approx(np.quantile(x64, 1 - percentiles[best]), rel=1e-5, abs=1e-5)
    assert upper.item() == pytest.approx(np.quantile(x64, percentiles[best]), rel=1e-5, abs=1e-5)


def test_per_channel_choice_is_made_channel_by_channel() -> None:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(20_000, 3, generator=generator)
    x[:4, 1] = 40.0  # only channel 1 has outliers
    x[:, 2] = torch.rand(20_000, generator=generator)  # channel 2 uniform on [0, 1)
    percentiles = (0.99, 0.999, 1.0)
    observer = UniformObserver("point", 4, percentiles, channel_dim=-1)
    observer.update(x)
    lower, upper = observer.best_bounds()
    assert lower.shape == upper.shape == (3,)
    for channel in range(3):
        column = x[:, channel].double().numpy()
        best = clear_winner(brute_force_uniform_errors(column, percentiles, 4))
        assert upper[channel].item() == pytest.approx(np.quantile(column, percentiles[best]), rel=1e-5, abs=1e-5)
        assert lower[channel].item() == pytest.approx(np.quantile(column, 1 - percentiles[best]), rel=1e-5, abs=1e-5)
    assert upper[1].item() < 40.0


def test_log_observer_picks_the_least_error_scale() -> None:
    generator = torch.Generator().manual_seed(3)
    attn = (2.0 * torch.randn(8, 40, generator=generator)).softmax(dim=-1)
    percentiles = (0.9, 0.99, 1.0)
    observer = LogSqrt2Observer("softmax", 3, percentiles)
    observer.update(attn)

    x64 = attn.double().numpy()
    best = clear_winner(brute_force_log_errors(x64, percentiles, 3))
    assert observer.scale().item() == pytest.approx(np.quantile(x64, percentiles[best]), rel=1e-5)


def test_batches_average_the_chosen_ranges() -> None:
    observer = UniformObserver("point", 8, (1.0,), channel_dim=None)
    observer.update(torch.tensor([-0.5, 0.0, 2.5]))
    observer.update(torch.tensor([-1.5, 0.5, 3.5]))
    lower, upper = observer.best_bounds()
    assert observer.batches == 2
    assert lower.item() == -1.0  # mean of -0.5 and -1.5
    assert upper.item() == 3.0  # mean of 2.5 and 3.5
    scale, zero_point = observer.qparams()
    assert scale.item() == pytest.approx(4.0 / 255.0, rel=1e-6)
    assert zero_point.item() == 64.0  # round(1 / (4 / 255)) = round(63.75)


def test_batches_choose_by_total_error_over_batches() -> None:
    # Batch 1 alone would keep its outlier (p=1.0 wins), batch 2 alone would clip; the summed errors decide.
    generator = torch.Generator().manual_seed(4)
    batch1 = torch.randn(1000, generator=generator)
    batch2 = torch.randn(1000, generator=generator)
    batch2[:3] = 30.0
    percentiles = (0.99, 1.0)
    observer = UniformObserver("point", 3, percentiles, channel_dim=None)
    observer.update(batch1)
    observer.update(batch2)
    lower, upper = observer.best_bounds()

    b1, b2 = batch1.double().numpy(), batch2.double().numpy()
    totals = [
        e1 + e2
        for e1, e2 in zip(
            brute_force_uniform_errors(b1, percentiles, 3), brute_force_uniform_errors(b2, percentiles, 3), strict=True
        )
    ]
    best = clear_winner(totals)
    p = percentiles[best]
    expected_upper = (np.quantile(b1, p) + np.quantile(b2, p)) / 2
    expected_lower = (np.quantile(b1, 1 - p) + np.quantile(b2, 1 - p)) / 2
    assert upper.item() == pytest.approx(expected_upper, rel=1e-5)
    assert lower.item() == pytest.approx(expected_lower, rel=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_raise_naming_the_point(bad: float) -> None:
    observer = UniformObserver("blocks.3.attn.qkv.input", 8, PERCENTILES, channel_dim=None)
    x = torch.randn(100)
    x[17] = bad
    with pytest.raises(CalibrationError, match=r"'blocks\.3\.attn\.qkv\.input'"):
        observer.update(x)
    log_observer = LogSqrt2Observer("blocks.3.attn.matmul2.a", 4, PERCENTILES)
    with pytest.raises(CalibrationError, match=r"'blocks\.3\.attn\.matmul2\.a'"):
        log_observer.update(x.abs())


def test_no_data_raises() -> None:
    observer = UniformObserver("head.input", 8, PERCENTILES, channel_dim=None)
    with pytest.raises(CalibrationError, match=r"'head\.input'.*no calibration data"):
        observer.qparams()
    observer.update(torch.empty(0))  # an empty batch is not data either
    with pytest.raises(CalibrationError, match=r"'head\.input'"):
        observer.best_bounds()
    with pytest.raises(CalibrationError, match=r"'softmax'"):
        LogSqrt2Observer("softmax", 4, PERCENTILES).scale()


def test_channel_range_tracks_min_and_max_across_batches() -> None:
    tracker = ChannelRange("qkv output")
    tracker.update(torch.tensor([[[1.0, -2.0, 5.0], [3.0, 0.0, 5.0]]]))
    tracker.update(torch.tensor([[-1.0, 4.0, 5.0]]))
    assert tracker.midpoint().tolist() == [1.0, 1.0, 5.0]  # ranges [-1, 3], [-2, 4], [5, 5]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_channel_range_rejects_non_finite_values(bad: float) -> None:
    with pytest.raises(CalibrationError, match="qkv output"):
        ChannelRange("qkv output").update(torch.tensor([[0.0, bad]]))


def test_channel_range_without_data_raises() -> None:
    with pytest.raises(CalibrationError, match="no calibration data"):
        ChannelRange("qkv output").midpoint()
