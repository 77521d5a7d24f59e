"""Magnitude pruning: exactly the requested share of the block weights, the smallest ones, nothing else touched."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny

from lrpq.prune.structure import StructureError
from lrpq.prune.unstructured import block_linears, magnitude_prune


@pytest.mark.parametrize("scope", ["global", "per-layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.37])
def test_requested_sparsity_is_reached_exactly_with_the_smallest_weights(scope: str, sparsity: float) -> None:
    model = build_tiny("swin")
    before = copy.deepcopy(model)
    report = magnitude_prune(model, sparsity, scope)
    layers, original = block_linears(model), block_linears(before)
    weights = [layer.weight.detach() for layer in layers.values()]
    zeros = [int((w == 0).sum()) for w in weights]
    if scope == "global":
        assert sum(zeros) == report.zeroed == round(sparsity * report.weights)
        groups = [list(zip(weights, original.values(), strict=True))]
    else:
        assert zeros == [round(sparsity * w.numel()) for w in weights]
        assert sum(zeros) == report.zeroed
        groups = [[pair] for pair in zip(weights, original.values(), strict=True)]
    assert report.weights == sum(w.numel() for w in weights)
    assert list(report.layers.values()) == pytest.approx([z / w.numel() for z, w in zip(zeros, weights, strict=True)])
    for group in groups:  # every zeroed weight was no larger than every kept one
        zeroed = torch.cat([layer.weight.detach()[w == 0].abs() for w, layer in group])
        kept = torch.cat([w[w != 0].abs() for w, _ in group])
        if len(zeroed) and len(kept):
            assert zeroed.max() <= kept.min()
    untouched = {name for name, _ in model.named_parameters()} - {f"{name}.weight" for name in layers}
    for name in untouched:
        assert torch.equal(model.get_parameter(name), before.get_parameter(name)), name


def test_bad_sparsity_or_scope_is_refused() -> None:
    with pytest.raises(StructureError, match=r"\[0, 1\)"):
        magnitude_prune(build_tiny("vit"), 1.0)
    with pytest.raises(StructureError, match="scope"):
        magnitude_prune(build_tiny("vit"), 0.5, "per-block")
