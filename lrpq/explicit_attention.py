"""Switch timm's fused attention off for a while, so q·kᵀ and the attention probabilities exist as tensors."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def explicit_attention(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Set ``fused_attn = False`` on each module that has the flag; restore every flag on exit.

    timm's fused SDPA path never materialises the attention scores, which relevance propagation and
    attention distillation both read. Modules without the flag are left untouched.
    """
    fused = {module: module.fused_attn for module in modules if hasattr(module, "fused_attn")}
    try:
        for module in fused:
            module.fused_attn = False
        yield
    finally:
        for module, value in fused.items():
            module.fused_attn = value
