"""The differentiable stand-ins: the inference values forward, STE and LSQ gradients backward."""

from __future__ import annotations

import torch

from lrpq.primitives import fake_quant_log2, fake_quant_uniform
from lrpq.recovery.ste import (
    fake_quant_log2_ste,
    fake_quant_uniform_ste,
    inverse_rectified_sigmoid,
    rectified_sigmoid,
)


def test_uniform_ste_values_and_gradients_by_hand() -> None:
    x = torch.tensor([-2.0, -0.26, 0.1, 0.74, 3.0], requires_grad=True)
    scale, zero_point = torch.tensor(0.5, requires_grad=True), torch.tensor(2.0)
    y = fake_quant_uniform_ste(x, scale, zero_point, 2)  # centred codes in [-2, 1]
    assert torch.equal(y.detach(), fake_quant_uniform(x.detach(), scale.detach(), zero_point, 2))
    assert y.tolist() == [-1.0, -0.5, 0.0, 0.5, 0.5]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # -4 and 6 fall outside the codes [-2, 1]: clipped
    # LSQ: inside round(v) − v, outside the clamped code; v = -4 (clipped to -2), -0.52, 0.2, 1.48, 6 (clipped to 1)
    expected = -2.0 + (-1 + 0.52) + (0 - 0.2) + (1 - 1.48) + 1.0
    assert torch.isclose(scale.grad, torch.tensor(expected), atol=1e-5)


def test_uniform_ste_learns_the_mse_scale_of_a_gaussian() -> None:
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    log_scale = torch.tensor(0.05).log().requires_grad_()
    optimiser = torch.optim.Adam([log_scale], lr=0.02)
    for _ in range(300):
        loss = (fake_quant_uniform_ste(x, log_scale.exp(), torch.tensor(8.0), 4) - x).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert 0.3 < log_scale.exp().item() < 0.37  # the 4-bit optimum of N(0, 1) is about 0.335


def test_log2_ste_values_and_gradients() -> None:
    p = torch.tensor([0.0, 0.01, 0.3, 0.9, 1.2], requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)
    y = fake_quant_log2_ste(p, scale, 4)
    assert torch.equal(y.detach(), fake_quant_log2(p.detach(), scale.detach(), 4))
    weights = torch.arange(1.0, 6.0)
    (y * weights).sum().backward()
    assert p.grad.tolist() == [1.0, 2.0, 3.0, 4.0, 0.0]  # above the top level (the scale) nothing passes
    assert torch.isclose(scale.grad, (weights * y.detach()).sum())  # a level is proportional to the scale


def test_rectified_sigmoid_and_its_inverse() -> None:
    h = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(rectified_sigmoid(inverse_rectified_sigmoid(h)), h, atol=1e-6)
    assert rectified_sigmoid(torch.tensor([-3.0, 0.0, 3.0])).tolist() == [0.0, 0.5, 1.0]


def test_uniform_ste_with_a_map_gives_the_inference_codes_at_rounding_boundaries() -> None:
    """``x·w + c`` formed as inference forms it: values on a rounding boundary (and one ulp either side) keep
    inference's codes, which quantizing the separately mapped tensor does not (20 of these 144 differ)."""
    scale, zero_point = torch.tensor(0.1), torch.tensor(8.0)
    weight, shift = torch.tensor([3.0, 0.7, 1.3]), torch.tensor([0.05, -0.02, 0.11])
    boundaries = ((torch.arange(-8, 8.0)[:, None] + 0.5) * scale - shift) / weight
    x = torch.cat([boundaries, *(torch.nextafter(boundaries, torch.full_like(boundaries, d)) for d in (1e9, -1e9))])
    x.requires_grad_(True)
    y = fake_quant_uniform_ste(x, scale, zero_point, 4, affine=(weight, shift))
    assert torch.equal(y.detach(), fake_quant_uniform(x.detach(), scale, zero_point, 4, affine=(weight, shift)))
    y.sum().backward()
    inside = (y.detach() > -zero_point * scale) & (y.detach() < (15 - zero_point) * scale)
    assert torch.equal(x.grad[inside], weight.expand_as(x)[inside])  # d(x·w + c)/dx passes straight through
