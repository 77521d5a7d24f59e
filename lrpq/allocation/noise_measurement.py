"""Measured quantization sensitivity: what each quantized layer alone costs the logits at every width.

Relevance says how much a layer contributes to the prediction, not how much quantizing it hurts; on
the reference DINOv2 ViT-S/14 the two disagree (its least relevant layers include the most sensitive
points), so relevance-driven plans lose to fixed bits there. Following Mix-QViT (Ranjan & Savakis,
2025), this measures the sensitivity directly: the model is calibrated once per width, and for every
layer its weight, then its inputs, are quantized alone while all else stays float; the logit noise
power relative to the float logits, on a few calibration images, is that layer's cost at that width.
``lrpq.allocation.plans`` then spends the budget where it removes the most noise.

Every quantized layer is measured and allocated, the patch embedding and the head too: the budget is
the mean width over the quantized layers, and on the reference ViT CIFAR-10 the 4-bit patch-embedding
weight is the largest single noise point. An input whose width the config pins whatever the target
(the patch embedding's, the image, at ``conv_abits``) is not measured and keeps that width.

GPTQ and bias correction are left out of the measurement. Bias correction moves every bias against
the error of all layers at once, so it does not let one layer be measured alone; measuring each weight
with its GPTQ rounding instead changed few widths and not the logit SNR (``docs/findings.md``), for a
GPTQ pass per width. The plan is then used with both.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lrpq.api import input_quantizers, quant_layers, quantize
from lrpq.config import BitPlan, QuantConfig
from lrpq.errors import LrpqError
from lrpq.noise_breakdown import layer_points, only_quantizing

DEFAULT_NOISE_IMAGES = 8


@dataclass
class LayerNoise:
    """``noise[layer][kind][bits]``: logit noise power / float logit power with only that point quantized.

    ``pinned_abits`` are the layers whose input width does not follow the target (not measured).
    """

    noise: dict[str, dict[str, dict[int, float]]]
    num_images: int
    pinned_abits: dict[str, int] = field(default_factory=dict)

    def curves(self, kind: str) -> dict[str, dict[int, float]]:
        """The layers measured for ``kind`` ("weight" or "inputs") and their noise per width."""
        return {name: kinds[kind] for name, kinds in self.noise.items() if kind in kinds}

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")


def noise_config(config: QuantConfig, **widths: int) -> QuantConfig:
    """``config`` (at ``widths``, if given) as the noise measurements calibrate it: no plan, no bias correction,
    and weights rounded to nearest on their own ranges (GPTQ off, and with it the input-weighted ranges it chooses)."""
    return dataclasses.replace(
        config, bit_plan=BitPlan(), gptq=False, weight_range_metric="mse", bias_correction=False, **widths
    )


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
    """Measure every quantized layer of the float ``model`` (left untouched) at every width in ``widths``.

    Each width calibrates a copy on all of ``calib`` with ``noise_config(config)`` at that width; the noise
    is measured on the first ``images`` calibration images.
    """
    if images < 1 or images > calib.shape[0]:
        raise LrpqError(f"images={images} must be between 1 and the {calib.shape[0]} calibration images")
    measured = calib[:images]
    noise: dict[str, dict[str, dict[int, float]]] = {}
    pinned: dict[str, int] = {}
    bits_range = range(widths[0], widths[1] + 1)
    bar = tqdm(desc="layer noise", unit="layer", disable=not progress)
    for bits in bits_range:
        at_width = noise_config(config, wbits=bits, abits=bits)
        quantized = quantize(copy.deepcopy(model), at_width, calib, progress=False)
        layers = quant_layers(quantized)
        bar.total = len(bits_range) * len(layers)
        with only_quantizing(quantized, ()):
            reference = quantized(measured)
        power = reference.pow(2).sum().item()
        for name, layer in layers.items():
            input_bits = {quantizer.bits for quantizer in input_quantizers(layer)}
            if input_bits != {bits}:
                (pinned[name],) = input_bits
            for kind, points in layer_points(layer).items():
                if kind == "inputs" and name in pinned:
                    continue
                with only_quantizing(quantized, points):
                    error = (quantized(measured) - reference).pow(2).sum().item()
                noise.setdefault(name, {}).setdefault(kind, {})[bits] = error / power
            bar.update()
    bar.close()
    return LayerNoise(noise, images, pinned)
