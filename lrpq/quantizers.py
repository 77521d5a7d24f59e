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
from lrpq.primitives import fake_quant_log2, fake_quant_log_sqrt2, fake_quant_uniform, quantize_uniform


class QuantMode(enum.Enum):
    OFF = "off"  # identity: the float model
    OBSERVE = "observe"  # identity, while an observer records statistics
    OBSERVE_QUANT = "observe_quant"  # record, then fake-quantize with the parameters observed so far
    OBSERVE_WEIGHTED = "observe_weighted"  # identity; record when backward brings the output's gradient
    QUANT = "quant"  # fake-quantize with frozen parameters


class FakeQuantizer(nn.Module):
    """Base class: a named quantization point with a bit width and an explicit mode.

    ``device`` and ``dtype`` are those of the tensors it quantizes (the layer's weight): its buffers are
    created there, so a quantized model on a GPU computes there from the start.
    """

    def __init__(
        self,
        name: str,
        bits: int,
        percentiles: tuple[float, ...],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.factory = {"device": device, "dtype": dtype}
        self.name = name
        self.bits = bits
        self.percentiles = percentiles
        self.mode = QuantMode.OFF
        self.observer: UniformObserver | LogSqrt2Observer | None = None
        self._pending: torch.Tensor | None = None  # OBSERVE_WEIGHTED: this batch's input, until its gradient

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
        if self.mode is QuantMode.OBSERVE_WEIGHTED:
            return self._observe_when_gradient_arrives(x)
        self.observer.update(x)
        if self.mode is QuantMode.OBSERVE:
            return x
        self.load_observer(self.observer)
        return self.fake_quant(x)

    def _observe_when_gradient_arrives(self, x: torch.Tensor) -> torch.Tensor:
        """Hand ``x`` on through a fresh autograd node; its gradient, squared, weighs ``x``'s errors.

        The new node sees only this point's consumer, so a tensor also read elsewhere (a residual)
        is weighted by what flows through the quantized path alone.
        """
        self._observe_pending()
        if not x.requires_grad:  # nothing upstream needs a gradient (the input image): plain error
            self.observer.update(x)
            return x
        self._pending = x.detach()
        passed_on = x.view_as(x)
        passed_on.register_hook(self._observe_with_gradient)
        return passed_on

    def _observe_with_gradient(self, gradient: torch.Tensor) -> None:
        if self._pending is not None:
            self.observer.update(self._pending, gradient.square())
            self._pending = None

    def _observe_pending(self) -> None:
        """A batch whose gradient never reached this point (its output was not used) counts unweighted."""
        if self._pending is not None:
            self.observer.update(self._pending)
            self._pending = None

    def start_observing(self, mode: QuantMode = QuantMode.OBSERVE) -> None:
        """Attach a fresh observer in one of the observing modes.

        OBSERVE_QUANT lets later layers calibrate on quantized inputs; OBSERVE_WEIGHTED records each
        batch when backward reaches it, weighing element errors by the squared gradient.
        """
        if mode not in (QuantMode.OBSERVE, QuantMode.OBSERVE_QUANT, QuantMode.OBSERVE_WEIGHTED):
            raise ValueError(f"{mode} is not an observing mode")
        self.observer = self.make_observer()
        self._pending = None
        self.mode = mode

    def finish_observing(self) -> None:
        """Freeze parameters from the observer and switch to QUANT."""
        if self.observer is None:
            raise RuntimeError(f"quantizer '{self.name}' has no observer to finish")
        self._observe_pending()
        self.load_observer(self.observer)
        self.observer = None
        self.mode = QuantMode.QUANT

    def abort_observing(self) -> None:
        self.observer = None
        self._pending = None
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
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(name, bits, percentiles, device=device, dtype=dtype)
        self.channel_dim = channel_dim
        self.register_buffer("scale", torch.ones(param_shape, **self.factory))
        self.register_buffer("zero_point", torch.zeros(param_shape, **self.factory))

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

    def fake_quant(
        self, x: torch.Tensor, out: torch.Tensor | None = None, affine: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``affine=(w, c)``: fake-quantize ``x·w + c`` in the same passes (``fake_quant_uniform``)."""
        return fake_quant_uniform(x, self.scale, self.zero_point, self.bits, out=out, affine=affine)


class WeightQuantizer(UniformQuantizer):
    """A weight's grid (per output channel by default) and, for each weight, the level it rounds to.

    GPTQ rounds some weights to a level other than the nearest. Holding that choice here, as an
    offset in levels from the nearest one, keeps the float weight itself unchanged: OFF is still the
    float model, QUANT reproduces GPTQ's weights exactly, and the offsets are part of the state dict.
    Offsets are zero (nearest rounding) after every ``calibrate_from``, until ``hold_rounding``.
    """

    def __init__(self, name: str, bits: int, percentiles: tuple[float, ...], weight: torch.Tensor, per_channel: bool):
        channel_shape = (weight.shape[0],) + (1,) * (weight.dim() - 1) if per_channel else ()
        super().__init__(
            name,
            bits,
            percentiles,
            channel_dim=0 if per_channel else None,
            param_shape=channel_shape,
            device=weight.device,
            dtype=weight.dtype,
        )
        self.register_buffer("rounding_offset", torch.zeros(weight.shape, dtype=torch.int8, device=weight.device))

    def calibrate_from(self, x: torch.Tensor) -> None:
        super().calibrate_from(x)
        self.rounding_offset.zero_()

    def hold_rounding(self, weight: torch.Tensor, rounded: torch.Tensor) -> None:
        """Quantize ``weight`` to ``rounded`` (values on this grid, e.g. GPTQ's) from now on."""
        self.rounding_offset.copy_(self.rounding_offsets(weight, rounded))

    def rounding_offsets(self, weight: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
        """The offsets (int8, levels from the nearest) that ``hold_rounding(weight, rounded)`` would hold."""
        levels = quantize_uniform(rounded, self.scale, self.zero_point, self.bits)
        offset = levels - quantize_uniform(weight, self.scale, self.zero_point, self.bits)
        require_offsets_fit(offset, self.rounding_offset.dtype, self.name)
        return offset.to(self.rounding_offset.dtype)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes QUANT dequantizes, as floats in [0, 2^b - 1]."""
        return quantize_uniform(weight, self.scale, self.zero_point, self.bits, offset=self.rounding_offset)

    def fake_quant(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return fake_quant_uniform(x, self.scale, self.zero_point, self.bits, offset=self.rounding_offset, out=out)


def require_offsets_fit(offset: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Raise ValueError if a rounding offset does not fit ``dtype``: a check of the data, so it reads it back."""
    most = torch.iinfo(dtype).max
    if offset.abs().max() > most:
        raise ValueError(f"quantizer '{name}': a rounding moves a weight by more than {most} levels")


class LogSqrt2Quantizer(FakeQuantizer):
    """Log√2 quantizer for post-softmax attention during calibration (RepQ-ViT).

    ``to_log2()`` gives the inference form: the same grid evaluated as a bit shift plus a parity
    selected scale, so the reparameterized model computes identical values.
    """

    def __init__(self, name: str, bits: int, percentiles: tuple[float, ...], **factory: object) -> None:
        super().__init__(name, bits, percentiles, **factory)
        self.register_buffer("scale", torch.ones((), **self.factory))

    def make_observer(self) -> LogSqrt2Observer:
        return LogSqrt2Observer(self.name, self.bits, self.percentiles)

    def load_observer(self, observer: LogSqrt2Observer) -> None:
        self.scale.copy_(observer.scale())

    def fake_quant(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return fake_quant_log_sqrt2(x, self.scale, self.bits, out=out)

    def to_log2(self) -> Log2Quantizer:
        log2 = Log2Quantizer(self.name, self.bits, self.percentiles, device=self.scale.device, dtype=self.scale.dtype)
        log2.scale.copy_(self.scale)
        log2.mode = self.mode
        return log2


class Log2Quantizer(FakeQuantizer):
    """Inference form of the log√2 quantizer: ``2^-shift · (s or s·√2)``, shift-friendly on hardware."""

    def __init__(self, name: str, bits: int, percentiles: tuple[float, ...], **factory: object) -> None:
        super().__init__(name, bits, percentiles, **factory)
        self.register_buffer("scale", torch.ones((), **self.factory))

    def make_observer(self) -> LogSqrt2Observer:
        raise RuntimeError(f"'{self.name}' is already in log2 inference form; calibrate before converting")

    def fake_quant(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return fake_quant_log2(x, self.scale, self.bits, out=out)
