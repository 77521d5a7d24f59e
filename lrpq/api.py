"""One call from a float timm model to a fake-quantized one: ``quantize(model, config, calib)``.

Stages: ``prepare`` (swap in quantized layers, all quantizers OFF) → rotate attention heads →
observe post-LN and post-GELU activations channel-wise and key ranges → fold CRL-clipped channel
factors into LayerNorm (or the sink's input reparameterization) and sink, give the sink's input
the folds' target grid, centre the keys (``reparam``) → calibrate weights on the folded values →
observe every other activation quantizer →
``convert`` (log√2 → log2) → QUANT; with ``config.gptq`` the same pass also collects every
Linear's input second moments, and GPTQ rounds each layer's weights on their grid as soon as its
last batch has passed it (``lrpq.gptq.StreamingRounding``). ``prepare`` followed by
``convert`` builds the same module tree without data, which is how a saved run is loaded back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lrpq.bias_correction import correcting_biases, output_means
from lrpq.calibrate import calibration, channel_observers, observe_inputs, observe_outputs
from lrpq.config import QuantConfig
from lrpq.devices import model_device
from lrpq.errors import LrpqError
from lrpq.gptq import StreamingRounding
from lrpq.modules import QuantConv2d, QuantLinear, QuantMatMul, attention_factory, quantized_linear_like
from lrpq.observers import ChannelRange
from lrpq.output_weighted_ranges import output_gradient_runner
from lrpq.quantizers import FakeQuantizer, LogSqrt2Quantizer, QuantMode
from lrpq.regions import Region, find_activation_sinks, find_regions
from lrpq.reparam import (
    FoldFactors,
    ensure_bias,
    fold_into_norm_and_sink,
    fold_into_sink,
    head_rotation,
    layerwise_fold_factors,
    rotate_heads,
    rotate_sink_input,
    shift_keys,
)

QuantLayer = QuantLinear | QuantConv2d | QuantMatMul


class UnsupportedModelError(LrpqError):
    """The model has no transformer attention lrpq knows how to quantize."""


def prepare(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace attention, Linear and Conv2d modules by quantized ones, in place; quantizers start OFF."""
    if not any(attention_factory(module) for module in model.modules()):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no supported attention (timm ViT/DeiT/DINOv2 Attention or Swin "
            "WindowAttention); other architectures need lrpq.modules.register_attention"
        )
    _replace(model, "", config)
    if config.ln_reparam:
        for region in find_regions(model):
            sink = model.get_submodule(region.sink)
            ensure_bias(sink)
            sink.input_owned = True  # a region's norm output feeds only its sink
    if config.post_gelu_reparam or config.rotate_hidden:
        for sink in find_activation_sinks(model):
            layer = model.get_submodule(sink)
            layer.add_input_reparam(rotate=config.rotate_hidden)
            layer.input_owned = True  # an activation region's output feeds only its sink
    if config.center_keys:
        for attention in shiftable_attentions(model).values():
            ensure_bias(attention.qkv)
    if config.bias_correction:
        for layer in weighted_layers(model).values():
            ensure_bias(layer)
    unknown = set(config.bit_plan.layers) - set(quant_layers(model))
    if unknown:
        raise LrpqError(
            f"bit plan names layers the model does not have: {', '.join(sorted(unknown)[:5])}"
            f"{' …' if len(unknown) > 5 else ''}"
        )
    return model


def _replace(parent: nn.Module, prefix: str, config: QuantConfig) -> None:
    for child_name, child in list(parent.named_children()):
        name = f"{prefix}{child_name}"
        factory = attention_factory(child)
        if factory is not None:
            child = factory(child, name, config)
            setattr(parent, child_name, child)
        else:
            replacement = quantized_linear_like(child, name, config)
            if replacement is not None:
                setattr(parent, child_name, replacement)
                continue
        _replace(child, f"{name}.", config)


def shiftable_attentions(model: nn.Module) -> dict[str, nn.Module]:
    """Quantized attention modules whose keys can be shifted through their qkv bias, by name."""
    return {name: module for name, module in model.named_modules() if getattr(module, "key_channels", None) is not None}


def rotatable_attentions(model: nn.Module) -> dict[str, nn.Module]:
    """Quantized attention modules whose queries and keys, or values, can be rotated exactly, by name."""
    return {
        name: module
        for name, module in model.named_modules()
        if getattr(module, "query_key_rotatable", False) or getattr(module, "values_rotatable", False)
    }


def rotate_attention_heads(
    attentions: dict[str, nn.Module], rotation_for: Callable[[int], torch.Tensor] = head_rotation
) -> None:
    """Rotate each head of every attention by ``rotation_for(head_dim)``, as far as each allows.

    The default is lrpq's (Hadamard, or seeded orthogonal) matrix; any orthogonal one keeps the model.
    """
    for attention in attentions.values():
        rotate_heads(
            attention.qkv,
            attention.proj if getattr(attention, "values_rotatable", False) else None,
            attention.num_heads,
            rotation_for(attention.qkv.out_features // (3 * attention.num_heads)),
            query_key=getattr(attention, "query_key_rotatable", False),
        )


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """Every quantized layer by its stable name (the keys of a bit plan)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, QuantLinear | QuantConv2d | QuantMatMul)
    }


def weighted_layers(model: nn.Module) -> dict[str, QuantLinear | QuantConv2d]:
    """The quantized layers that have weights (and so a bias to correct), by name."""
    return {name: layer for name, layer in quant_layers(model).items() if isinstance(layer, QuantLinear | QuantConv2d)}


def quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    """Every quantization point by its name (``<layer>.input``, ``<layer>.weight``, ``<layer>.a`` …)."""
    return {module.name: module for module in model.modules() if isinstance(module, FakeQuantizer)}


def set_mode(model: nn.Module, mode: QuantMode) -> None:
    """Switch every quantizer, e.g. OFF to compare against the float function of the same model."""
    for quantizer in quantizers(model).values():
        quantizer.mode = mode


def convert(model: nn.Module) -> nn.Module:
    """Swap log√2 softmax quantizers for their log2 (shift) inference form, in place."""
    for module in model.modules():
        if isinstance(module, QuantMatMul) and isinstance(module.a_quantizer, LogSqrt2Quantizer):
            module.a_quantizer = module.a_quantizer.to_log2()
    return model


CalibData = torch.Tensor | Sequence[Any]
BatchRunner = Callable[[nn.Module, Any], object]


def _batches(calib: CalibData, batch_size: int) -> Sequence[Any]:
    return calib.split(batch_size) if isinstance(calib, torch.Tensor) else calib


def _run(model: nn.Module, calib: CalibData, batch_size: int, run: BatchRunner, desc: str, progress: bool) -> None:
    if len(calib) == 0:
        raise LrpqError("no calibration images were given")
    batches = _batches(calib, batch_size)
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        run(model, batch)


def _forward(model: nn.Module, batch: torch.Tensor) -> object:
    return model(batch.to(model_device(model), non_blocking=True))


def input_quantizers(layer: QuantLayer) -> list[FakeQuantizer]:
    """The quantizers of what ``layer`` reads: its input, or both operands of a matmul."""
    if isinstance(layer, QuantMatMul):
        return [layer.a_quantizer, layer.b_quantizer]
    return [layer.input_quantizer]


def activation_quantizers(model: nn.Module) -> list[FakeQuantizer]:
    """Quantizers of layer inputs and matmul operands: the ones calibrated from data."""
    return [quantizer for layer in quant_layers(model).values() for quantizer in input_quantizers(layer)]


def _reparameterize(
    model: nn.Module,
    regions: list[Region],
    activation_sinks: list[str],
    attentions: dict[str, nn.Module],
    config: QuantConfig,
    calib: CalibData,
    batch_size: int,
    run: BatchRunner,
    progress: bool,
) -> list[FakeQuantizer]:
    """Observe every sink's input channel-wise and every qkv output's range in one pass, then fold.

    The folds keep the float function, so the key ranges seen before them are the ones after them.
    With ``config.folded_grid == "target"`` each sink's per-tensor input grid is the folds' target
    grid, set here; those quantizers are returned (still OFF) so calibration leaves them as set.
    """
    sinks = {name: model.get_submodule(name) for name in [region.sink for region in regions] + activation_sinks}
    bits = {name: sink.input_quantizer.bits for name, sink in sinks.items()}
    qkvs = {name: attention.qkv for name, attention in attentions.items()}
    key_ranges = {name: ChannelRange(f"{name}.qkv output") for name in attentions}
    observers = channel_observers(sinks, bits, config.percentiles)
    region_sinks = {region.sink: sinks[region.sink] for region in regions}
    rotations = {name: sinks[name].input_reparam.rotation for name in activation_sinks}
    rotated = {name: rotation for name, rotation in rotations.items() if rotation is not None}
    unrotated = {name: sinks[name] for name, rotation in rotations.items() if rotation is None}
    with (
        observe_inputs(region_sinks | unrotated, observers),
        observe_outputs(rotated, observers),  # a rotated sink input is folded as rotated
        observe_outputs(qkvs, key_ranges),
    ):
        _run(model, calib, batch_size, run, "channel stats", progress)

    def factors(sink: str) -> FoldFactors:
        """CRL clips the post-LayerNorm channel grids, as LRP-QViT defines it; the post-GELU fold is unclipped."""
        scale, zero_point = observers[sink].qparams()
        return layerwise_fold_factors(scale, zero_point, config.clip_k if sink in region_sinks else None)

    folds = {name: factors(name) for name in sinks}
    for region in regions:
        fold_into_norm_and_sink(model.get_submodule(region.norm), sinks[region.sink], folds[region.sink])
    for sink in activation_sinks:
        fold_into_sink(sinks[sink].input_reparam, sinks[sink], folds[sink])
    for name, attention in attentions.items():
        keys = attention.key_channels
        shift_keys(attention.qkv, keys, key_ranges[name].midpoint()[keys])
    if config.folded_grid != "target":
        return []
    for name, fold in folds.items():
        sinks[name].input_quantizer.set_qparams(fold.target_scale, fold.target_zero_point)
    return [sink.input_quantizer for sink in sinks.values()]


def _float_output_means(
    model: nn.Module,
    layers: dict[str, QuantLinear | QuantConv2d],
    calib: CalibData,
    batch_size: int,
    run: BatchRunner,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Each layer's per-channel output mean with every quantizer still off: bias correction's target."""
    if not layers:
        return {}
    means = output_means(layers)
    with observe_outputs(layers, means):
        _run(model, calib, batch_size, run, "float means", progress)
    return {name: mean.mean() for name, mean in means.items()}


@torch.no_grad()
def quantize(
    model: nn.Module,
    config: QuantConfig,
    calib: CalibData,
    *,
    batch_size: int = 32,
    run: BatchRunner = _forward,
    progress: bool = True,
) -> nn.Module:
    """Quantize ``model`` in place with ``config``, calibrating on ``calib``; returns ``model``.

    ``calib`` is an (N, 3, H, W) tensor already preprocessed for the model, or a sequence of batches
    that ``run(model, batch)`` feeds to the model (a detector's own data pipeline, say). It is read
    twice: once for the channel statistics of the reparameterization, once for every quantizer; bias
    correction reads a tensor ``calib`` twice more, in batches for the float means and as one batch;
    ``range_metric='output'`` adds a backward pass to the quantizers' pass.
    """
    if config.bias_correction and not isinstance(calib, torch.Tensor):  # before any pass is spent
        raise LrpqError("bias correction needs the calibration images as one tensor (it runs them as one batch)")
    if config.range_metric == "output" and not isinstance(calib, torch.Tensor):
        raise LrpqError("range_metric='output' needs the calibration images as a tensor (it backpropagates logits)")
    model.eval()
    prepare(model, config)
    if config.rotate_heads:  # data-free and exact: before anything observes q, k, v or proj's input
        rotate_attention_heads(rotatable_attentions(model))
    if config.rotate_hidden:  # data-free and exact: the fold below takes its statistics after it
        for sink in find_activation_sinks(model):
            layer = model.get_submodule(sink)
            rotate_sink_input(layer.input_reparam, layer)
    regions = find_regions(model) if config.ln_reparam else []
    activation_sinks = find_activation_sinks(model) if config.post_gelu_reparam else []
    attentions = shiftable_attentions(model) if config.center_keys else {}
    fixed_grids: list[FakeQuantizer] = []
    if regions or activation_sinks or attentions:
        fixed_grids = _reparameterize(
            model, regions, activation_sinks, attentions, config, calib, batch_size, run, progress
        )
    weighted = weighted_layers(model)
    corrected = weighted if config.bias_correction else {}
    float_means = _float_output_means(model, corrected, calib, batch_size, run, progress)
    for layer in weighted.values():
        layer.weight_quantizer.calibrate_from(layer.weight)
    rounded = {name: layer for name, layer in weighted.items() if isinstance(layer, QuantLinear)} if config.gptq else {}
    batches = len(_batches(calib, batch_size))
    roundings = {
        name: StreamingRounding(
            name, layer.weight, layer.weight_quantizer, batches, choose_range=config.weight_range_metric == "inputs"
        )
        for name, layer in rounded.items()
    }
    gptq_inputs = {name: rounded[name].input_quantizer for name in roundings}  # what F.linear reads
    points = [point for point in activation_quantizers(model) if point not in fixed_grids]
    if config.calibrate_on_quantized:  # later layers then see these inputs quantized as they will be
        for quantizer in fixed_grids:
            quantizer.mode = QuantMode.QUANT
    if config.range_metric == "output":
        mode, calibration_run = QuantMode.OBSERVE_WEIGHTED, output_gradient_runner()
    else:
        mode, calibration_run = QuantMode.OBSERVE_QUANT if config.calibrate_on_quantized else QuantMode.OBSERVE, run
    with calibration(points, mode), observe_inputs(gptq_inputs, roundings):
        _run(model, calib, batch_size, calibration_run, "calibration", progress)
    for quantizer in fixed_grids:
        quantizer.mode = QuantMode.QUANT
    for name, rounding in roundings.items():  # held only now, so the pass saw every weight at its nearest level
        offsets = rounding.finish()
        if offsets is not None:
            rounded[name].weight_quantizer.rounding_offset.copy_(offsets)
    convert(model)
    if corrected:
        with correcting_biases(corrected, float_means):
            run(model, calib)
    return model
