"""Hadamard constructions, their Kronecker factors, and the online rotation built from them."""

from __future__ import annotations

import pytest
import torch

from lrpq.rotation import (
    KroneckerRotation,
    hadamard_factors,
    kronecker_rotate,
    paley_hadamard,
    seeded_orthogonal,
    sylvester_hadamard,
)


def assert_hadamard(matrix: torch.Tensor) -> None:
    order = matrix.shape[0]
    assert set(matrix.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(matrix @ matrix.T, order * torch.eye(order, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("order", [1, 2, 4, 64])
def test_sylvester_hadamard_is_hadamard(order: int) -> None:
    matrix = sylvester_hadamard(order)
    assert matrix.shape == (order, order)
    if order > 1:
        assert_hadamard(matrix)


@pytest.mark.parametrize("order", [0, 3, 12])
def test_sylvester_hadamard_refuses_orders_that_are_not_powers_of_two(order: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        sylvester_hadamard(order)


@pytest.mark.parametrize("q", [3, 7, 11, 19, 23, 43])
def test_paley_hadamard_is_hadamard_of_order_q_plus_one(q: int) -> None:
    matrix = paley_hadamard(q)
    assert matrix.shape == (q + 1, q + 1)
    assert_hadamard(matrix)


@pytest.mark.parametrize("q", [5, 9, 13, 15])
def test_paley_hadamard_refuses_other_q(q: int) -> None:
    with pytest.raises(ValueError, match="prime congruent to 3 mod 4"):
        paley_hadamard(q)


@pytest.mark.parametrize(
    ("channels", "left_order"),
    [(64, 1), (192, 12), (768, 12), (1536, 12), (3072, 12), (160, 20), (96, 12), (24, 12)],
)
def test_hadamard_factors_of_transformer_widths_are_a_scaled_hadamard_matrix(channels: int, left_order: int) -> None:
    left, right = hadamard_factors(channels)
    assert left.shape == (left_order, left_order) and right.shape == (channels // left_order,) * 2
    full = torch.kron(left, right)
    torch.testing.assert_close(full @ full.T, torch.eye(channels, dtype=torch.float64), rtol=0, atol=1e-12)
    # Every entry ±1/√n: one channel spreads over all others with equal weight.
    torch.testing.assert_close(full.abs(), torch.full_like(full, channels**-0.5), rtol=0, atol=1e-15)


@pytest.mark.parametrize(("channels", "odd"), [(112, 7), (9, 9), (13 * 4, 13)])
def test_hadamard_factors_fall_back_to_a_seeded_orthogonal_odd_part(channels: int, odd: int) -> None:
    left, right = hadamard_factors(channels)
    assert torch.equal(left, seeded_orthogonal(odd)) and right.shape == (channels // odd,) * 2
    full = torch.kron(left, right)
    torch.testing.assert_close(full @ full.T, torch.eye(channels, dtype=torch.float64), rtol=0, atol=1e-12)


def test_kronecker_rotation_starts_as_identity_and_then_multiplies_by_the_kronecker_product() -> None:
    rotation = KroneckerRotation(96)
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rotation(x), x, rtol=0, atol=0)
    left, right = hadamard_factors(96)
    rotation.set_factors(left, right)
    expected = (x.double() @ torch.kron(left, right)).float()
    torch.testing.assert_close(rotation(x), expected, rtol=0, atol=1e-5)
    assert set(rotation.state_dict()) == {"left", "right"}


def test_kronecker_rotation_refuses_factors_of_another_shape() -> None:
    rotation = KroneckerRotation(96)
    with pytest.raises(ValueError, match=r"do not match \(12, 12\) ⊗ \(8, 8\)"):
        rotation.set_factors(torch.eye(8), torch.eye(12))


@pytest.mark.parametrize("channels", [1536, 768, 96, 64, 9])
def test_kronecker_rotate_equals_the_dense_product_to_float32_rounding(channels: int) -> None:
    left, right = hadamard_factors(channels)
    x = torch.randn(3, 7, channels, generator=torch.Generator().manual_seed(channels))
    dense = x.double() @ torch.kron(left, right)
    fast = kronecker_rotate(x, left.float(), right.float())
    assert fast.shape == x.shape and fast.dtype == torch.float32
    torch.testing.assert_close(fast, dense.float(), rtol=0, atol=4 * torch.finfo(torch.float32).eps * x.abs().max())
    torch.testing.assert_close(kronecker_rotate(x.double(), left, right), dense, rtol=0, atol=1e-12)


def test_kronecker_rotate_can_write_over_its_input() -> None:
    left, right = hadamard_factors(96)
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(2))
    expected = kronecker_rotate(x, left.float(), right.float())
    result = kronecker_rotate(x, left.float(), right.float(), out=x)
    assert result.data_ptr() == x.data_ptr() and torch.equal(result, expected)


@pytest.mark.parametrize("piece", [1, 96 * 5, 96 * 64])
def test_kronecker_rotate_by_pieces_equals_one_product_over_all_rows(
    monkeypatch: pytest.MonkeyPatch, piece: int
) -> None:
    left, right = (factor.float() for factor in hadamard_factors(96))
    x = torch.randn(2, 13, 96, generator=torch.Generator().manual_seed(3))
    rows = x.reshape(-1, *left.shape[:1], right.shape[0])
    whole = torch.mm(torch.bmm(left.T.expand(len(rows), -1, -1), rows).view(-1, right.shape[0]), right).view(x.shape)
    monkeypatch.setattr("lrpq.rotation._ROTATION_PIECE", piece)
    assert torch.equal(kronecker_rotate(x, left, right), whole)
    assert torch.equal(kronecker_rotate(x.clone(), left, right, out=torch.empty_like(x)), whole)


def test_kronecker_rotate_records_its_gradient() -> None:
    left, right = (factor.float() for factor in hadamard_factors(96))
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(4), requires_grad=True)
    kronecker_rotate(x, left, right).pow(2).sum().backward()
    # An orthogonal map keeps the squared norm, whose gradient is then 2x.
    torch.testing.assert_close(x.grad, 2 * x.detach(), rtol=0, atol=1e-5)
