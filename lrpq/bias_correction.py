"""Sequential bias correction: every layer's quantized output mean set back to its float mean.

Rounding weights and clipping activations shift a layer's output on average (Nagel et al., "Data-Free
Quantization", ICCV 2019, §4.2, measured empirically here), and the shift of one layer is the input
error of the next. The float mean of every Linear and Conv2d output is recorded in a pass with every
quantizer off (after the reparameterizations, which keep the float function). After calibration, one
pass with every quantizer on runs the whole calibration set as a single batch and, in forward order,
adds ``float mean − quantized mean`` to each layer's bias and to the output it hands on. Each layer is
therefore corrected for its own error and for the error its corrected predecessors still pass it,
which is what per-layer passes would give, at the cost of one forward. Means are per output channel
over every other axis (images, tokens, pixels).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from lrpq.calibrate import hooks


def _channel_dim(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Conv2d) else -1


def _other_dims(output: torch.Tensor, channel_dim: int) -> list[int]:
    channel_dim %= output.dim()
    return [dim for dim in range(output.dim()) if dim != channel_dim]


def _broadcast(values: torch.Tensor, output: torch.Tensor, channel_dim: int) -> torch.Tensor:
    shape = [1] * output.dim()
    shape[channel_dim] = -1
    return values.reshape(shape)


class OutputMean:
    """Running per-channel mean of a layer's outputs, summed in float64 so millions of values add without drift."""

    def __init__(self, channel_dim: int) -> None:
        self.channel_dim = channel_dim
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, output: torch.Tensor) -> None:
        dims = _other_dims(output, self.channel_dim)
        sums = output.detach().sum(dim=dims, dtype=torch.float64)
        self.total = sums if self.total is None else self.total + sums
        self.count += output.numel() // output.shape[self.channel_dim]

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("OutputMean.mean() before any update: the layer never ran")
        return self.total / self.count


def output_means(layers: Mapping[str, nn.Module]) -> dict[str, OutputMean]:
    """One ``OutputMean`` per layer, to feed through ``calibrate.observe_outputs``."""
    return {name: OutputMean(_channel_dim(layer)) for name, layer in layers.items()}


@contextmanager
def correcting_biases(layers: Mapping[str, nn.Module], float_means: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, each forward of a layer moves its bias (and output) so the output mean is the float one.

    Run exactly one forward inside: the corrections are computed from whatever batch it sees, so that
    batch must be the whole calibration set.
    """

    def hook_for(name: str):
        def correct(layer: nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            channel_dim = _channel_dim(layer)
            quantized_mean = output.mean(dim=_other_dims(output, channel_dim), dtype=torch.float64)
            shift = (float_means[name] - quantized_mean).to(output.dtype)
            layer.bias.add_(shift)
            return output.add_(_broadcast(shift, output, channel_dim))

        return correct

    with hooks([layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]):
        yield
