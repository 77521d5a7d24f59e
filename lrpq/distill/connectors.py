"""Learnable maps between student and teacher features, shared by several losses."""

from __future__ import annotations

import torch
from torch import nn


def identity_linear(width: int, *, bias: bool = True) -> nn.Linear:
    """A width → width Linear that starts as the identity: student and teacher widths are equal here, so
    at step 0 a connector changes nothing and the loss measures the quantization error alone."""
    linear = nn.Linear(width, width, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(width))
        if bias:
            linear.bias.zero_()
    return linear
