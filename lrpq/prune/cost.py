"""Parameters and FLOPs of a model at its input size: what pruning buys, counted the same way before and after.

FLOPs are multiply-accumulates (the convention of fvcore and of the ViT/pruning papers' "FLOPs"):
every Linear and Conv2d, and both attention products (q·kᵀ and attn·v), measured by running one
zero image through the model with hooks, so Swin's windows, patch merging and every block's own
head count and hidden width are counted as they actually run. Norms, softmax, GELU and additions
are left out, as those papers do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lrpq.calibrate import hooks


@dataclass(frozen=True)
class ModelCost:
    """Parameter count and multiply-accumulates of one forward pass of one image."""

    params: int
    flops: int

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_attention(module: nn.Module) -> bool:
    """timm's and lrpq's attention modules: a ``qkv`` Linear feeding ``num_heads`` heads."""
    return isinstance(getattr(module, "qkv", None), nn.Linear) and hasattr(module, "num_heads")


def _macs(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return inputs[0].numel() * module.out_features
    if isinstance(module, nn.Conv2d):
        kernel = module.kernel_size[0] * module.kernel_size[1]
        return output.numel() * (module.in_channels // module.groups) * kernel
    # attention: q·kᵀ and attn·v, each (windows · tokens² · head channels summed over heads)
    windows, tokens = inputs[0].shape[0], inputs[0].shape[1]
    return 2 * windows * tokens * tokens * (module.qkv.out_features // 3)


@torch.no_grad()
def model_cost(model: nn.Module, input_size: Sequence[int]) -> ModelCost:
    """Parameters and per-image multiply-accumulates of ``model`` on a (C, H, W) input."""
    total = [0]

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        total[0] += _macs(module, inputs, output)

    counted = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d) or _is_attention(m)]
    training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with hooks([m.register_forward_hook(count) for m in counted]):
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(training)
    return ModelCost(sum(p.numel() for p in model.parameters()), total[0])
