"""Calibration as context managers: observers exist only inside the ``with`` block.

``calibration(quantizers)`` switches quantizers to OBSERVE and, on a clean exit, freezes their
parameters and switches them to QUANT; on an exception they go back to OFF with nothing half-set.
``observe_channels(modules)`` records per-channel input statistics of modules through forward
pre-hooks that are removed on exit, for the reparameterization's first pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from lrpq.observers import UniformObserver
from lrpq.quantizers import FakeQuantizer


@contextmanager
def calibration(quantizers: Iterable[FakeQuantizer], quantize_while_observing: bool = False) -> Iterator[None]:
    """Observe with ``quantizers`` inside the block; freeze and enable them when it ends cleanly.

    With ``quantize_while_observing`` each quantizer passes on its fake-quantized input, so every
    layer is calibrated on the quantized activations it will see at inference (as RepQ-ViT does).
    """
    quantizers = list(quantizers)
    for quantizer in quantizers:
        quantizer.start_observing(quantize_while_observing)
    try:
        yield
        for quantizer in quantizers:
            quantizer.finish_observing()
    except BaseException:
        for quantizer in quantizers:
            quantizer.abort_observing()
        raise


@contextmanager
def observe_channels(
    modules: Mapping[str, nn.Module], bits: Mapping[str, int], percentiles: tuple[float, ...]
) -> Iterator[dict[str, UniformObserver]]:
    """Per-channel (last dim) observers of each module's input, fed by temporary pre-hooks."""
    observers = {name: UniformObserver(f"{name}.input", bits[name], percentiles, channel_dim=-1) for name in modules}

    def hook_for(observer: UniformObserver):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            observer.update(args[0])

        return record

    handles = [module.register_forward_pre_hook(hook_for(observers[name])) for name, module in modules.items()]
    try:
        yield observers
    finally:
        for handle in handles:
            handle.remove()
