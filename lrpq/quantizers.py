"""Fake-quantizer modules with an explicit mode: off, observe or quant.

A quantizer never calibrates itself on first use. ``calibration(...)`` (see ``lrpq.calibrate``) attaches
an observer and switches to OBSERVE; leaving the context computes the parameters and switches to QUANT.
Parameters live in buffers, so a quantized model saves and loads through its state dict.
"""

from __future__ import annotations

import enum

import torch
from torch import nn

from lrpq.observers import LogSqrt2Observer, UniformObserver
from lrpq.primitives import fake_quant_log2, fake_quant_log_sqrt2, fake_quant_uniform


class QuantMode(enum.Enum):
    OFF = "off"  # identity: the float model
    OBSERVE = "observe"  # identity, while an observer records statistics
    OBSERVE_QUANT = "observe_quant"  # record, then fake-quantize with the parameters observed so far
    QUANT = "quant"  # fake-quantize with frozen parameters


class FakeQuantizer(nn.Module):
    """Base class: a named quantization point with a bit width and an explicit mode."""

    def __init__(self, name: str, bits: int, percentiles: tuple[float, ...]) -> None:
        super().__init__()
        self.name = name
        self.bits = bits
        self.percentiles = percentiles
        self.mode = QuantMode.OFF
        self.observer: UniformObserver | LogSqrt2Observer | None = None

    def forward(self, x: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
        """``overwrite``: the caller owns ``x`` and lets frozen parameters quantize it in place.

        A fresh buffer of a large activation costs more than the arithmetic (its pages are mapped
        on first touch), so layers pass their own intermediates (scaled queries, attention
        probabilities, reparameterized inputs) to be overwritten at inference.
        """
        if self.mode is QuantMode.QUANT:
            in_place = overwrite and not x.requires_grad and x.is_contiguous()
            return self.fake_quant(x, out=x if in_place else None)
        if self.mode is QuantMode.OFF:
            return x
        if self.observer is None:
            raise RuntimeError(f"quantizer '{self.name}' is observing without an observer")
        self.observer.update(x)
        if self.mode is QuantMode.OBSERVE:
            return x
        self.load_observer(self.observer)
        return self.fake_quant(x)

    def start_observing(self, quantize_output: bool = False) -> None:
        """Attach a fresh observer; ``quantize_output`` lets later layers calibrate on quantized inputs."""
        self.observer = self.make_observer()
        self.mode = QuantMode.OBSERVE_QUANT if quantize_output else QuantMode.OBSERVE

    def finish_observing(self) -> None:
        """Freeze parameters from the observer and switch to QUANT."""
        if self.observer is None:
            raise RuntimeError(f"quantizer '{self.name}' has no observer to finish")
        self.load_observer(self.observer)
        self.observer = None
        self.mode = QuantMode.QUANT

    def abort_observing(self) -> None:
        self.observer = None
        self.mode = QuantMode.OFF

    def make_observer(self) -> UniformObserver | LogSqrt2Observer:
        raise NotImplementedError

    def load_observer(self, observer: UniformObserver | LogSqrt2Observer) -> None:
        raise NotImplementedError

    def fake_quant(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, bits={self.bits}, mode={self.mode.value}"


class UniformQuantizer(FakeQuantizer):
    """Asymmetric uniform quantizer, per tensor (``channel_dim=None``) or per channel.

    ``param_shape`` is the broadcast shape of the parameters: ``()`` per tensor, ``(C, 1)`` for the
    output channels of a Linear weight, ``(C, 1, 1, 1)`` for a Conv2d weight.
    """

    def __init__(
        self,
        name: str,
        bits: int,
        percentiles: tuple[float, ...],
        channel_dim: int | None = None,
        param_shape: tuple[int, ...] = (),
    ) -> None:
        super().__init__(name, bits, percentiles)
        self.channel_dim = channel_dim
        self.register_buffer("scale", torch.ones(param_shape))
        self.register_buffer("zero_point", torch.zeros(param_shape))

    def make_observer(self) -> UniformObserver:
        return UniformObserver(self.name, self.bits, self.percentiles, self.channel_dim)

    def load_observer(self, observer: UniformObserver) -> None:
        scale, zero_point = observer.qparams()
        self.set_qparams(scale, zero_point)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))

    def calibrate_from(self, x: torch.Tensor) -> None:
        """Calibrate on one tensor known up front (a weight): observe it once and freeze."""
        self.start_observing()
        self.observer.update(x)
        self.finish_observing()

    def fake_quant(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return fake_quant_uniform(x, self.scale, self.zero_point, self.bits, out=out)


class LogSqrt2Quantizer(FakeQuantizer):
    """Log√2 quantizer for post-softmax attention during calibration (RepQ-ViT).

    ``to_log2()`` gives the inference form: the same grid evaluated as a bit shift plus a parity
    selected scale, so the reparameterized model computes identical values.
    """

    def __init__(self, name: str, bits: int, percentiles: tuple[float, ...]) -> None:
        super().__init__(name, bits, percentiles)
        self.register_buffer("scale", torch.ones(()))

    def make_observer(self) -> LogSqrt2Observer:
        return LogSqrt2Observer(self.name, self.bits, self.percentiles)

    def load_observer(self, observer: LogSqrt2Observer) -> None:
        self.scale.copy_(observer.scale())

    def fake_quant(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return fake_quant_log_sqrt2(x, self.scale, self.bits, out=out)

    def to_log2(self) -> Log2Quantizer:
        log2 = Log2Quantizer(self.name, self.bits, self.percentiles)
        log2.scale.copy_(self.scale)
        log2.mode = self.mode
        return log2


class Log2Quantizer(FakeQuantizer):
    """Inference form of the log√2 quantizer: ``2^-shift · (s or s·√2)``, shift-friendly on hardware."""

    def __init__(self, name: str, bits: int, percentiles: tuple[float, ...]) -> None:
        super().__init__(name, bits, percentiles)
        self.register_buffer("scale", torch.ones(()))

    def make_observer(self) -> LogSqrt2Observer:
        raise RuntimeError(f"'{self.name}' is already in log2 inference form; calibrate before converting")

    def fake_quant(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return fake_quant_log2(x, self.scale, self.bits, out=out)
