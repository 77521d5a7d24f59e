"""The first-order layer noise estimate against the exact one-layer-at-a-time measurement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny, tiny_input
from timm.layers import LayerScale

from lrpq.allocation.noise_estimate import estimate_layer_noise
from lrpq.allocation.noise_measurement import measure_layer_noise
from lrpq.config import QuantConfig
from lrpq.ranking import kendall_tau


def _flat(noise, names_kinds_bits) -> np.ndarray:
    return np.array([noise.noise[name][kind][bits] for name, kind, bits in names_kinds_bits])


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_estimate_agrees_with_the_exact_measurement(family: str) -> None:
    """Same layers, kinds and widths; ranked alike (τ ≥ 0.85) and within a factor 1.6 at the median."""
    model = build_tiny(family)
    for module in model.modules():
        if isinstance(module, LayerScale):  # timm starts it at 1e-5: blocks would move the logits by rounding only
            module.gamma.data.fill_(1.0)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    calib = tiny_input(family, 8)
    exact = measure_layer_noise(model, QuantConfig(4, 4), calib, (3, 6), images=8, progress=False)
    estimate = estimate_layer_noise(model, QuantConfig(4, 4), calib, (3, 6), images=8, progress=False)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())  # untouched
    assert estimate.pinned_abits == exact.pinned_abits
    keys = [
        (name, kind, bits) for name, kinds in exact.noise.items() for kind, curve in kinds.items() for bits in curve
    ]
    assert {(n, k) for n, kinds in estimate.noise.items() for k in kinds} == {(n, k) for n, k, _ in keys}
    measured, estimated = _flat(exact, keys), _flat(estimate, keys)
    assert kendall_tau(measured, estimated) >= 0.85
    assert 1 / 1.6 < np.median(estimated / measured) < 1.6


def test_estimate_needs_images_it_has() -> None:
    with pytest.raises(Exception, match="images=3 must be between 1 and the 2"):
        estimate_layer_noise(build_tiny("vit"), QuantConfig(4, 4), tiny_input("vit", 2), (4, 5), images=3)
