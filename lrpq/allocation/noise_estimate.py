"""Every quantized layer's logit noise at every width, read off a few backward passes at once.

``lrpq.allocation.noise_measurement`` measures what each layer's weight, then its inputs, alone cost
the logits at each width: one calibration per width and a forward pass per layer, kind and width
(296 passes on a ViT-S). This estimates the same numbers to first order in one sweep: the logits move
by ``J·e`` for a quantization error ``e`` at one point, so with the error of every point at every width
and the gradient of every logit at every point, each layer's noise ``‖J·e‖²`` is a sum of products.

* Grids: the model is quantized once at the target widths on the estimation images (folds, key
  centring, rotations, CRL target grids); every other width gets its own grid — weights from their
  own range, activations by the same percentile search as calibration, run at every width in one
  pass, and a CRL target grid keeps its range at every width.
* Gradients: with every quantizer off, one backward pass per logit (a model with more than
  ``EXACT_PROBES`` classes uses that many random Gaussian projections of the logits instead, an
  unbiased estimate) gives the gradient at every quantization point and at every Linear's output.
* Noise of a layer's inputs at width ``b``: per image, ``Σ g ⊙ (Q_b(x) − x)`` over its input (both
  operands of a matmul); of its weight: ``Σ g_y ⊙ (x·(Q_b(W) − W)ᵀ)`` over its output. Squared, summed
  over images and logits, divided by the float logits' power: the same ratio the exact measurement
  reports, so ``lrpq.allocation.plans`` takes either.

Errors of different points are treated as adding up, as in the exact measurement; second-order
terms are left out, which is what makes it one sweep instead of one pass per layer and width.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lrpq.allocation.noise_measurement import DEFAULT_NOISE_IMAGES, LayerNoise, noise_config
from lrpq.api import input_quantizers, quant_layers, quantize, set_mode
from lrpq.config import QuantConfig
from lrpq.errors import LrpqError
from lrpq.modules import QuantConv2d, QuantLinear
from lrpq.observers import LogSqrt2Observer, UniformObserver
from lrpq.primitives import fake_quant_log_sqrt2, fake_quant_uniform, uniform_qparams
from lrpq.quantizers import FakeQuantizer, Log2Quantizer, LogSqrt2Quantizer, QuantMode, UniformQuantizer
from lrpq.regions import find_activation_sinks, find_regions

EXACT_PROBES = 16  # up to this many classes, one backward per logit gives ‖J·e‖² exactly
PROBE_SEED = 0
IMAGES_PER_PASS = 2  # images whose activations, errors and gradients are held at once


class _Grid:
    """Fake quantization of one point at one width (uniform or log√2)."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int) -> None:
        self.scale, self.zero_point, self.bits = scale, zero_point, bits

    def error(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero_point is None:
            return fake_quant_log_sqrt2(x, self.scale, self.bits) - x
        return fake_quant_uniform(x, self.scale, self.zero_point, self.bits) - x


def _is_log(quantizer: FakeQuantizer) -> bool:
    return isinstance(quantizer, LogSqrt2Quantizer | Log2Quantizer)


def _observer(quantizer: FakeQuantizer, bits: int) -> UniformObserver | LogSqrt2Observer:
    if _is_log(quantizer):
        return LogSqrt2Observer(quantizer.name, bits, quantizer.percentiles)
    return UniformObserver(quantizer.name, bits, quantizer.percentiles, quantizer.channel_dim)


def _regridded(quantizer: UniformQuantizer, bits: int) -> _Grid:
    """A calibrated grid's range with ``2^bits`` levels: a CRL target grid at another width."""
    lower = -quantizer.zero_point * quantizer.scale
    upper = (2**quantizer.bits - 1 - quantizer.zero_point) * quantizer.scale
    return _Grid(*uniform_qparams(lower, upper, bits), bits)


def _weight_grid(layer: QuantLinear | QuantConv2d, bits: int) -> _Grid:
    quantizer = layer.weight_quantizer
    observer = UniformObserver(quantizer.name, bits, quantizer.percentiles, quantizer.channel_dim)
    observer.update(layer.weight)
    scale, zero_point = observer.qparams()
    return _Grid(scale.reshape(quantizer.scale.shape), zero_point.reshape(quantizer.zero_point.shape), bits)


@contextmanager
def _capturing(points: dict[str, FakeQuantizer], layers: dict[str, QuantLinear | QuantConv2d]) -> Iterator[dict]:
    """Record each point's input and each weighted layer's output on every forward."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, quantizer in points.items():
        handles.append(quantizer.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0])))
    for name, layer in layers.items():
        handles.append(
            layer.register_forward_hook(lambda _m, _args, out, name=name: seen.__setitem__(f"{name}:out", out))
        )
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _weight_delta_output(layer: QuantLinear | QuantConv2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, QuantConv2d):
        return layer._conv_forward(x, delta, None)
    return F.linear(x, delta)


def _probes(logits: torch.Tensor, generator: torch.Generator) -> tuple[list[torch.Tensor], float]:
    """Output gradients to back-propagate, and the factor that turns their summed squares into ‖J·e‖²."""
    classes = logits.shape[1]
    if classes <= EXACT_PROBES:
        eye = torch.eye(classes, dtype=logits.dtype, device=logits.device)
        return [eye[c].expand_as(logits) for c in range(classes)], 1.0
    probes = [torch.randn(logits.shape, generator=generator).to(logits) for _ in range(EXACT_PROBES)]
    return probes, 1.0 / EXACT_PROBES


def _per_image(products: torch.Tensor, images: int) -> torch.Tensor:
    """(widths, images): sums of ``products`` (widths, …) over each image's elements, batch-major after widths."""
    return products.reshape(products.shape[0], images, -1).sum(2, dtype=torch.float64)


def estimate_layer_noise(
    model: nn.Module,
    config: QuantConfig,
    calib: torch.Tensor,
    widths: tuple[int, int],
    *,
    images: int = DEFAULT_NOISE_IMAGES,
    progress: bool = True,
) -> LayerNoise:
    """First-order estimate of ``measure_layer_noise``'s numbers for the float ``model`` (left untouched).

    The model is calibrated once, with ``noise_config(config)`` at ``config``'s widths, on the first
    ``images`` calibration images, which are also the images the noise is estimated on.
    """
    if images < 1 or images > calib.shape[0]:
        raise LrpqError(f"images={images} must be between 1 and the {calib.shape[0]} calibration images")
    measured = calib[:images]
    bits_range = list(range(widths[0], widths[1] + 1))
    at_target = noise_config(config)
    quantized = quantize(copy.deepcopy(model), at_target, measured, progress=False)
    set_mode(quantized, QuantMode.OFF)
    layers = quant_layers(quantized)
    weighted = {name: layer for name, layer in layers.items() if isinstance(layer, QuantLinear | QuantConv2d)}
    # An input the config pins whatever the target (the patch embedding's: the image) keeps its width.
    pinned = {name: config.conv_abits for name, layer in layers.items() if isinstance(layer, QuantConv2d)}
    pinned = {name: bits for name, bits in pinned.items() if bits is not None}
    every_point = {q.name: q for layer in layers.values() for q in input_quantizers(layer)}
    points = {q.name: q for name, layer in layers.items() if name not in pinned for q in input_quantizers(layer)}
    fixed = set()
    if config.folded_grid == "target":
        sinks = [region.sink for region in find_regions(quantized)] if config.ln_reparam else []
        sinks += find_activation_sinks(quantized) if config.post_gelu_reparam else []
        fixed = {f"{sink}.input" for sink in sinks}
    device = next(quantized.parameters()).device
    measured = measured.to(device)

    # Pass 1: the percentile search of every searched point at every width, in one forward.
    observers = {name: {b: _observer(q, b) for b in bits_range} for name, q in points.items() if name not in fixed}
    with _capturing(every_point, {}) as seen, torch.no_grad():
        for start in range(0, images, IMAGES_PER_PASS):
            quantized(measured[start : start + IMAGES_PER_PASS])
            for name, per_width in observers.items():
                for observer in per_width.values():
                    observer.update(seen[name])
    grids: dict[str, dict[int, _Grid]] = {}
    for name, quantizer in points.items():
        if name in fixed:
            grids[name] = {b: _regridded(quantizer, b) for b in bits_range}
        elif _is_log(quantizer):
            grids[name] = {b: _Grid(observers[name][b].scale(), None, b) for b in bits_range}
        else:
            grids[name] = {b: _Grid(*observers[name][b].qparams(), b) for b in bits_range}
    weight_deltas = {
        name: {b: _weight_grid(layer, b).error(layer.weight.detach()) for b in bits_range}
        for name, layer in weighted.items()
    }

    # Pass 2: per image, the first-order logit change of every point at every width, for every probe.
    squares = {
        (name, kind): torch.zeros(len(bits_range), dtype=torch.float64)
        for name in layers
        for kind in ("inputs", "weight")
    }
    power = 0.0
    generator = torch.Generator().manual_seed(PROBE_SEED)
    bar = tqdm(total=images, desc="noise estimate", unit="img", disable=not progress, leave=False)
    for start in range(0, images, IMAGES_PER_PASS):
        batch = measured[start : start + IMAGES_PER_PASS].clone().requires_grad_(True)
        count = batch.shape[0]
        with _capturing(every_point, weighted) as seen, torch.enable_grad():
            logits = quantized(batch)
        power += float(logits.detach().double().pow(2).sum())
        errors = {name: torch.stack([grids[name][b].error(seen[name].detach()) for b in bits_range]) for name in points}
        output_errors = {
            name: torch.stack(
                [
                    _weight_delta_output(layer, seen[layer.input_quantizer.name].detach(), weight_deltas[name][b])
                    for b in bits_range
                ]
            )
            for name, layer in weighted.items()
        }
        targets = list(points) + [f"{name}:out" for name in weighted]
        tensors = [seen[name] for name in points] + [seen[f"{name}:out"] for name in weighted]
        probes, factor = _probes(logits.detach(), generator)
        for probe in probes:
            grads = dict(zip(targets, torch.autograd.grad(logits, tensors, probe, retain_graph=True), strict=True))
            for name, layer in layers.items():
                if name not in pinned:
                    change = sum(_per_image(grads[q.name] * errors[q.name], count) for q in input_quantizers(layer))
                    squares[(name, "inputs")] += factor * change.pow(2).sum(1)
                if name in weighted:
                    change = _per_image(grads[f"{name}:out"] * output_errors[name], count)
                    squares[(name, "weight")] += factor * change.pow(2).sum(1)
        del logits, seen, errors, output_errors
        bar.update(count)
    bar.close()
    noise: dict[str, dict[str, dict[int, float]]] = {}
    for name in layers:
        kinds = ([] if name in pinned else ["inputs"]) + (["weight"] if name in weighted else [])
        noise[name] = {
            kind: dict(zip(bits_range, (squares[(name, kind)] / power).tolist(), strict=True)) for kind in kinds
        }
    return LayerNoise(noise, images, pinned)
