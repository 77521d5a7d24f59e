"""Chefer's elementary rules on hand-built tensors: conservation, the z⁺ rule by autograd, the layer score."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from relevance_helpers import per_image_sums

from lrpq.relevance import (
    add_relevance,
    clone_relevance,
    layer_contribution,
    matmul_relevance,
    safe_divide,
    zplus_linear,
    zplus_relevance,
)


def test_zplus_linear_conserves_relevance_for_nonnegative_inputs_without_bias() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 7, generator=generator)
    weight = torch.randn(5, 7, generator=generator)
    r = torch.rand(4, 5, generator=generator)
    r_in = zplus_linear(x, weight, r)
    assert r_in.shape == x.shape
    assert (r_in >= 0).all()
    torch.testing.assert_close(per_image_sums(r_in), per_image_sums(r), rtol=1e-5, atol=1e-6)


def test_zplus_linear_equals_the_autograd_z_plus_rule() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 7, generator=generator)  # mixed signs: both x⁺w⁺ and x⁻w⁻ terms count
    weight = torch.randn(5, 7, generator=generator)
    r = torch.randn(2, 6, 5, generator=generator)
    torch.testing.assert_close(zplus_linear(x, weight, r), zplus_relevance(F.linear, x, weight, r))


def test_safe_divide_stabilises_away_from_zero_and_drops_exact_zeros() -> None:
    numerator = torch.tensor([1.0, 1.0, 1.0, 1.0])
    denominator = torch.tensor([2.0, -2.0, 0.0, -0.0])
    assert safe_divide(numerator, denominator, eps=1.0).tolist() == pytest.approx([1 / 3, -1 / 3, 0.0, 0.0])


def test_zplus_conv_conserves_relevance_for_mixed_sign_inputs() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    weight = torch.randn(4, 3, 2, 2, generator=generator)
    r = torch.rand(2, 4, 4, 4, generator=generator)
    r_in = zplus_relevance(lambda inp, w: F.conv2d(inp, w, stride=2), x, weight, r)
    torch.testing.assert_close(per_image_sums(r_in), per_image_sums(r), rtol=1e-5, atol=1e-6)


def test_matmul_split_conserves_relevance_between_the_two_operands() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 6, 4, generator=generator)
    b = torch.randn(3, 2, 4, 5, generator=generator)
    r = torch.rand(3, 2, 6, 5, generator=generator)
    r_a, r_b = matmul_relevance(a, b, r)
    assert r_a.shape == a.shape and r_b.shape == b.shape
    torch.testing.assert_close(per_image_sums(r_a) + per_image_sums(r_b), per_image_sums(r), rtol=1e-4, atol=1e-5)
    # For a bilinear product gradient×input gives each operand the full relevance: an even split.
    torch.testing.assert_close(per_image_sums(r_a), per_image_sums(r) / 2, rtol=1e-4, atol=1e-5)


def test_residual_add_conserves_and_clone_sums() -> None:
    generator = torch.Generator().manual_seed(0)
    skip = torch.randn(2, 5, 3, generator=generator)
    branch = torch.randn(2, 5, 3, generator=generator)
    r = torch.rand(2, 5, 3, generator=generator)
    r_skip, r_branch = add_relevance(skip, branch, r)
    total = per_image_sums(r_skip) + per_image_sums(r_branch)
    torch.testing.assert_close(total, per_image_sums(r), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(clone_relevance(r_skip, r_branch), r_skip + r_branch)
    assert torch.equal(clone_relevance(r_skip, r_branch), torch.stack([r_skip, r_branch]).sum(0))


def test_zplus_equals_gradient_times_input_on_a_positive_linear_chain() -> None:
    """With x ≥ 0 and w ≥ 0 every term x·w is positive, so z⁺ is the plain z-rule (LRP-0); on a
    bias-free linear chain seeded with the target logit itself, LRP-0 is exactly gradient × input."""
    generator = torch.Generator().manual_seed(0)
    w1, w2 = torch.rand(6, 8, generator=generator), torch.rand(3, 6, generator=generator)
    x = torch.rand(2, 8, generator=generator).requires_grad_()
    logits = F.linear(F.linear(x, w1), w2)
    (grad,) = torch.autograd.grad(logits[:, 1].sum(), x)
    seed = torch.zeros_like(logits)
    seed[:, 1] = logits[:, 1].detach()
    r_hidden = zplus_linear(F.linear(x, w1).detach(), w2, seed)
    r_input = zplus_linear(x.detach(), w1, r_hidden)
    torch.testing.assert_close(r_input, x.detach() * grad, rtol=1e-5, atol=1e-6)


def test_layer_contribution_is_the_positive_part_of_gradient_times_relevance() -> None:
    # grad (-2, 3, -1, 4) ⊙ R (-0.5, -1, 2, 0.25) = (1, -3, -2, 1): the negative·negative product counts,
    # so (∇A ⊙ R)⁺ = (1, 0, 0, 1) and its mean is 0.5 (clamping R first would give 0.25).
    grad = torch.tensor([[-2.0, 3.0], [-1.0, 4.0]]).reshape(1, 2, 2)
    relevance = torch.tensor([[-0.5, -1.0], [2.0, 0.25]]).reshape(1, 2, 2)
    assert layer_contribution(grad, relevance, 1).tolist() == [0.5]
    assert layer_contribution(torch.cat([grad, -grad]), torch.cat([relevance, relevance]), 2).tolist() == [0.5, 1.25]
