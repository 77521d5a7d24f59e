"""Measured quantization sensitivity: what each block layer alone costs the logits at every width.

Relevance says how much a layer contributes to the prediction, not how much quantizing it hurts; on
the reference DINOv2 ViT-S/14 the two disagree (its least relevant layers include the most sensitive
points), so relevance-driven plans lose to fixed bits there. Following Mix-QViT (Ranjan & Savakis,
2025), this measures the sensitivity directly: the model is calibrated once per width, and for every
layer its weight, then its inputs, are quantized alone while all else stays float; the logit noise
power relative to the float logits, on a few calibration images, is that layer's cost at that width.
``lrpq.allocate.noise_allocation`` then spends the budget where it removes the most noise.

GPTQ and bias correction are left out of the measurement: GPTQ rounds weights in place (they would
stay rounded with their quantizers off) and bias correction moves every bias against the error of all
layers at once, so neither lets one layer be measured alone. The plan is then used with them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lrpq.allocate import noise_allocation
from lrpq.api import quant_layers, quantize
from lrpq.config import BitPlan, LayerBits, QuantConfig
from lrpq.errors import LrpqError
from lrpq.mixed import ALLOCATION_EXCLUDED_BLOCKS
from lrpq.noise import layer_points, only_quantizing
from lrpq.relevance import block_of_layers

DEFAULT_NOISE_IMAGES = 8
SENSITIVITY_ALLOCATOR = "sensitivity"  # the CLI name of this allocator, beside lrpq.allocate.ALLOCATORS


@dataclass
class LayerNoise:
    """``noise[layer][kind][bits]``: logit noise power / float logit power with only that point quantized."""

    noise: dict[str, dict[str, dict[int, float]]]
    num_images: int

    def curves(self, kind: str) -> dict[str, dict[int, float]]:
        """The layers measured for ``kind`` ("weight" or "inputs") and their noise per width."""
        return {name: kinds[kind] for name, kinds in self.noise.items() if kind in kinds}

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")


@torch.no_grad()
def measure_layer_noise(
    model: nn.Module,
    config: QuantConfig,
    calib: torch.Tensor,
    widths: tuple[int, int],
    *,
    images: int = DEFAULT_NOISE_IMAGES,
    progress: bool = True,
) -> LayerNoise:
    """Measure every block layer of the float ``model`` (left untouched) at every width in ``widths``.

    Each width calibrates a copy on all of ``calib`` with ``config`` at that width (no plan, no GPTQ,
    no bias correction); the noise is measured on the first ``images`` calibration images.
    """
    if images < 1 or images > calib.shape[0]:
        raise LrpqError(f"images={images} must be between 1 and the {calib.shape[0]} calibration images")
    measured = calib[:images]
    noise: dict[str, dict[str, dict[int, float]]] = {}
    bits_range = range(widths[0], widths[1] + 1)
    bar = tqdm(desc="layer noise", unit="layer", disable=not progress)
    for bits in bits_range:
        at_width = dataclasses.replace(
            config, wbits=bits, abits=bits, bit_plan=BitPlan(), gptq=False, bias_correction=False
        )
        quantized = quantize(copy.deepcopy(model), at_width, calib, progress=False)
        every = quant_layers(quantized)
        blocks = block_of_layers(every, quantized)
        layers = [name for name in every if blocks[name] not in ALLOCATION_EXCLUDED_BLOCKS]  # as relevance plans
        bar.total = len(bits_range) * len(layers)
        with only_quantizing(quantized, ()):
            reference = quantized(measured)
        power = reference.pow(2).sum().item()
        for name in layers:
            for kind, points in layer_points(every[name]).items():
                with only_quantizing(quantized, points):
                    error = (quantized(measured) - reference).pow(2).sum().item()
                noise.setdefault(name, {}).setdefault(kind, {})[bits] = error / power
            bar.update()
    bar.close()
    return LayerNoise(noise, images)


def plan_from_noise(noise: LayerNoise, *, wbits: int, abits: int) -> BitPlan:
    """Weight bits over the measured weight layers and activation bits over every layer, each at its mean.

    Weightless layers (attention matmuls) keep ``wbits``, which their quantizers ignore, as in
    ``lrpq.allocate.make_bit_plan``.
    """
    weight_bits = noise_allocation(noise.curves("weight"), wbits)
    activation_bits = noise_allocation(noise.curves("inputs"), abits)
    return BitPlan({name: LayerBits(weight_bits.get(name, wbits), activation_bits[name]) for name in noise.noise})
