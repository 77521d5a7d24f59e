"""Where a quantized model's error comes from: logit SNR with only some quantizers switched on.

A fake-quantized model computes its float function when every quantizer is OFF, so switching on one
group of quantization points at a time isolates that group's share of the output noise. The reference
is the same model with everything OFF, so the reparameterizations (exact up to rounding) cancel out.
GPTQ's rounding lives in the weight quantizers (``WeightQuantizer.rounding_offset``), so it counts
only where a weight is switched on. Biases moved by ``bias_correction`` stay with everything OFF, and
they offset the mean error of all points at once, so break down models without it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from lrpq.api import input_quantizers, quant_layers, quantizers
from lrpq.errors import LrpqError
from lrpq.modules import QuantMatMul
from lrpq.quantizers import QuantMode


def snr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (``inf`` when the two are equal), as torchao's ``compute_error``."""
    noise = (reference - approximation).norm().item()
    if noise == 0.0:
        return math.inf
    return 20 * math.log10(reference.norm().item() / noise)


@contextmanager
def only_quantizing(model: nn.Module, points: Collection[str]) -> Iterator[None]:
    """Quantize at the named points only (every other quantizer OFF); restore every mode on exit."""
    every = quantizers(model)
    unknown = sorted(set(points) - set(every))
    if unknown:
        raise LrpqError(f"no quantization point named {unknown[0]!r}; names look like {next(iter(every), '?')!r}")
    saved = {name: quantizer.mode for name, quantizer in every.items()}
    try:
        for name, quantizer in every.items():
            quantizer.mode = QuantMode.QUANT if name in points else QuantMode.OFF
        yield
    finally:
        for name, quantizer in every.items():
            quantizer.mode = saved[name]


def layer_points(layer: nn.Module) -> dict[str, list[str]]:
    """A quantized layer's points by kind: ``inputs`` (input or both matmul operands) and ``weight``."""
    points = {"inputs": [quantizer.name for quantizer in input_quantizers(layer)]}
    if not isinstance(layer, QuantMatMul):
        points["weight"] = [layer.weight_quantizer.name]
    return points


def groups_by_layer(model: nn.Module) -> dict[str, list[str]]:
    """``<layer> inputs`` and ``<layer> weight`` point groups, per layer."""
    return {
        f"{name} {kind}": points
        for name, layer in quant_layers(model).items()
        for kind, points in layer_points(layer).items()
    }


def groups_by_kind(model: nn.Module) -> dict[str, list[str]]:
    """Points of the same role in every block (``attn.matmul1.a``, ``mlp.fc2.input`` …).

    A point's kind is its name after the last block index, so ``blocks.3.attn.proj.weight`` and
    ``layers.1.blocks.0.attn.proj.weight`` share one group and ``patch_embed.proj.weight`` has its own.
    """
    groups: dict[str, list[str]] = {}
    for name in quantizers(model):
        parts = name.split(".")
        indices = [i for i, part in enumerate(parts) if part.isdigit()]
        groups.setdefault(".".join(parts[indices[-1] + 1 :] if indices else parts), []).append(name)
    return groups


@torch.no_grad()
def noise_breakdown(
    model: nn.Module,
    images: torch.Tensor,
    groups: Mapping[str, Collection[str]],
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, float]:
    """Logit SNR (dB) against the all-OFF model with only each group's points quantized.

    One forward pass over ``images`` per group: a by-layer breakdown of a ViT-S is ~150 passes.
    """

    def logits() -> torch.Tensor:
        return torch.cat([model(batch) for batch in images.split(batch_size)])

    with only_quantizing(model, ()):
        reference = logits()
    result = {}
    for label, points in tqdm(groups.items(), desc="noise breakdown", disable=not progress, leave=False):
        with only_quantizing(model, points):
            result[label] = snr_db(reference, logits())
    return result
