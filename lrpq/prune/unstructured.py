"""Magnitude weight pruning, the non-structured baseline: zero the smallest weights of the block Linears.

The weights considered are those of qkv, proj, fc1 and fc2 in every transformer block (the layers
structured pruning shrinks; the patch embedding, Swin's patch merging and the classifier stay dense).
``global`` zeroes the smallest |w| over all of them together, ``per-layer`` the same share of every
layer. Exactly round(sparsity · count) weights are zeroed (ties: lower flat index first), so the
result is reported as a sparsity: a dense kernel runs a sparse model no faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrpq.prune.structure import StructureError, prunable_blocks

SCOPES = ("global", "per-layer")


@dataclass(frozen=True)
class Sparsity:
    """Zeroed weights over the weights considered, overall and per layer."""

    scope: str
    zeroed: int
    weights: int
    layers: dict[str, float]

    @property
    def sparsity(self) -> float:
        return self.zeroed / self.weights

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "sparsity": self.sparsity,
            "zeroed": self.zeroed,
            "weights": self.weights,
            "layers": self.layers,
        }


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """qkv, proj, fc1 and fc2 of every prunable block, by name."""
    return {
        f"{name}.{path}": block.get_submodule(path)
        for name, block in prunable_blocks(model).items()
        for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }


def _smallest(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the ``count`` smallest values (stable: equal values by index)."""
    return torch.sort(magnitudes, stable=True).indices[:count]


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "global") -> Sparsity:
    """Zero round(sparsity · n) of the block Linears' weights with the smallest magnitude, in place."""
    if not 0.0 <= sparsity < 1.0:
        raise StructureError(f"sparsity {sparsity} must be in [0, 1)")
    if scope not in SCOPES:
        raise StructureError(f"sparsity scope {scope!r} is unknown; use one of: {', '.join(SCOPES)}")
    layers = block_linears(model)
    weights = [layer.weight for layer in layers.values()]
    if scope == "global":
        flat = torch.cat([w.detach().abs().reshape(-1) for w in weights])
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[_smallest(flat, round(sparsity * len(flat)))] = True
        masks = mask.split([w.numel() for w in weights])
    else:
        masks = []
        for w in weights:
            mask = torch.zeros(w.numel(), dtype=torch.bool)
            mask[_smallest(w.detach().abs().reshape(-1), round(sparsity * w.numel()))] = True
            masks.append(mask)
    for w, mask in zip(weights, masks, strict=True):
        w.masked_fill_(mask.view_as(w), 0.0)
    per_layer = {name: float(m.float().mean()) for name, m in zip(layers, masks, strict=True)}
    return Sparsity(scope, sum(int(m.sum()) for m in masks), sum(w.numel() for w in weights), per_layer)
