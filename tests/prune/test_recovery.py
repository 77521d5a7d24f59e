"""Recovery: the refit never raises the calibration error and reproduces a target the kept units can represent."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny, tiny_input
from hypothesis import given, settings
from hypothesis import strategies as st

from lrpq.prune.recovery import RIDGES, NormalEquations, RecoveryError, cross_validated_ridge, refit_consumers
from lrpq.prune.structure import BlockKeep, PrunedStructure, apply_structure, unpruned


def equations(x: torch.Tensor, y: torch.Tensor) -> NormalEquations:
    result = NormalEquations.zeros(x.shape[1], y.shape[1])
    result.add(x.double(), y.double())
    return result


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(0, 10_000), st.sampled_from(RIDGES), st.integers(2, 12), st.integers(3, 40))
def test_a_refit_never_fits_worse_than_its_prior(seed: int, ridge: float, inputs: int, tokens: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(tokens, inputs, generator=generator), torch.randn(tokens, 3, generator=generator)
    prior = torch.randn(inputs, 3, generator=generator, dtype=torch.float64)
    system = equations(x, y)
    assert system.error(system.solve(prior, ridge)) <= system.error(prior) * (1 + 1e-9) + 1e-9


def test_an_exactly_representable_target_is_reproduced() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    coefficients = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    folds = [equations(part, part @ coefficients) for part in x.split(50)]
    prior = torch.zeros(6, 4, dtype=torch.float64)
    assert cross_validated_ridge(folds, prior) == RIDGES[0]  # no noise: the least damping predicts best
    total = sum(folds[1:], folds[0])
    torch.testing.assert_close(total.solve(prior, RIDGES[0]), coefficients, rtol=1e-4, atol=1e-5)


def duplicated_channel_model() -> torch.nn.Module:
    """A ViT whose hidden channel 1 of block 1 is a copy of channel 0 (same fc1 row and bias)."""
    model = build_tiny("vit")
    with torch.no_grad():
        fc1 = model.blocks[1].mlp.fc1
        fc1.weight[1], fc1.bias[1] = fc1.weight[0], fc1.bias[0]
    return model


def test_refit_moves_a_removed_duplicate_channel_onto_its_twin() -> None:
    """Channel 1 = channel 0, so fc2's column 0 can take column 1's share: the block output is exact again."""
    model = duplicated_channel_model()
    structure = unpruned(model)
    keep = structure.blocks["blocks.1"]
    blocks = dict(structure.blocks)
    blocks["blocks.1"] = BlockKeep(keep.num_heads, keep.hidden_features, keep.heads, keep.hidden[:1] + keep.hidden[2:])
    structure = PrunedStructure(blocks)
    images = tiny_input("vit", batch=24, seed=3)  # 408 tokens for 192 inputs
    pruned = apply_structure(copy.deepcopy(model), structure)
    with torch.no_grad():
        dropped_error = (pruned(images) - model(images)).abs().max()
        reports = refit_consumers(pruned, model, structure, images, batch_size=8, progress=False)
        assert [report.layer for report in reports] == ["blocks.1:hidden"]  # nothing upstream changed
        assert reports[0].before > 1e-3
        assert reports[0].after < 1e-9
        refit_error = (pruned(images) - model(images)).abs().max()
    assert dropped_error > 1e-3
    assert refit_error < 1e-5


def test_refit_lowers_every_consumers_calibration_error_on_a_real_pruning() -> None:
    model = build_tiny("swin")
    structure = unpruned(model)
    blocks = {
        name: BlockKeep(keep.num_heads, keep.hidden_features, keep.heads[1:], keep.hidden[::2])
        for name, keep in structure.blocks.items()
    }
    structure = PrunedStructure(blocks)
    pruned = apply_structure(copy.deepcopy(model), structure)
    reports = refit_consumers(pruned, model, structure, tiny_input("swin", batch=6), progress=False)
    assert len(reports) == 2 * len(blocks)
    assert all(report.after <= report.before for report in reports)
    assert any(report.after < 0.9 * report.before for report in reports)


def test_recovery_needs_two_images() -> None:
    model = build_tiny("vit")
    with pytest.raises(RecoveryError, match="at least 2"):
        refit_consumers(copy.deepcopy(model), model, unpruned(model), tiny_input("vit", batch=1), progress=False)
