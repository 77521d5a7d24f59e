"""Calibration as context managers: observers exist only inside the ``with`` block.

``calibration(quantizers)`` switches quantizers to OBSERVE and, on a clean exit, freezes their
parameters and switches them to QUANT; on an exception they go back to OFF with nothing half-set.
``observe_inputs(modules, recorders)`` and ``observe_outputs(modules, recorders)`` feed module inputs
or outputs to reducers (channel observers, key ranges, GPTQ's second moments) through hooks that are
removed on exit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lrpq.observers import UniformObserver
from lrpq.quantizers import FakeQuantizer, QuantMode


@contextmanager
def calibration(quantizers: Iterable[FakeQuantizer], mode: QuantMode = QuantMode.OBSERVE) -> Iterator[None]:
    """Observe with ``quantizers`` inside the block; freeze and enable them when it ends cleanly.

    With ``QuantMode.OBSERVE_QUANT`` each quantizer passes on its fake-quantized input, so every
    layer is calibrated on the quantized activations it will see at inference (as RepQ-ViT does);
    with ``QuantMode.OBSERVE_WEIGHTED`` each batch is recorded when a backward pass through the
    block's forwards brings its gradient (``lrpq.output_weighted_ranges``).
    """
    quantizers = list(quantizers)
    for quantizer in quantizers:
        quantizer.start_observing(mode)
    try:
        yield
        for quantizer in quantizers:
            quantizer.finish_observing()
    except BaseException:
        for quantizer in quantizers:
            quantizer.abort_observing()
        raise


class Recorder(Protocol):
    """Anything that reduces a stream of tensors batch by batch."""

    def update(self, x: torch.Tensor) -> None: ...


@contextmanager
def hooks(handles: list[RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def channel_observers(
    modules: Mapping[str, nn.Module], bits: Mapping[str, int], percentiles: tuple[float, ...]
) -> dict[str, UniformObserver]:
    """Per-channel (last dim) observers of each module's input, to feed through ``observe_inputs``."""
    return {name: UniformObserver(f"{name}.input", bits[name], percentiles, channel_dim=-1) for name in modules}


@contextmanager
def observe_inputs(modules: Mapping[str, nn.Module], recorders: Mapping[str, Recorder]) -> Iterator[None]:
    """Feed each module's (first) input to its recorder through temporary forward pre-hooks."""

    def hook_for(recorder: Recorder):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            recorder.update(args[0])

        return record

    with hooks([module.register_forward_pre_hook(hook_for(recorders[name])) for name, module in modules.items()]):
        yield


@contextmanager
def observe_outputs(modules: Mapping[str, nn.Module], recorders: Mapping[str, Recorder]) -> Iterator[None]:
    """Feed each module's output to its recorder through temporary forward hooks."""

    def hook_for(recorder: Recorder):
        def record(_module: nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            recorder.update(output)

        return record

    with hooks([module.register_forward_hook(hook_for(recorders[name])) for name, module in modules.items()]):
        yield
