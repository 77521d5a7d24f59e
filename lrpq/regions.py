"""Source → sink regions, found from the module structure.

A region is a module whose output feeds exactly one Linear channel-for-channel, so per-channel
factors can be moved out of the activation and into the sink's weights:

* LayerNorm regions (timm's pre-norm blocks: ``norm1 → attn.qkv``, ``norm2 → mlp.fc1``; Swin
  ``PatchMerging``: ``norm → reduction``) absorb the factors in the norm's affine (RepQ-ViT);
* activation regions (timm ``Mlp``: ``act → fc2``, the post-GELU hidden activation) cannot, since
  GELU is not scale-equivariant, so the sink keeps them at its input (``reparam.InputReparam``).

Which children form a region is a property of the block class, registered below; nothing is
selected by matching substrings of module names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from timm.layers import Mlp
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from lrpq.errors import LrpqError

RegionRule = Callable[[nn.Module], list[tuple[str, str]]]


def _pre_norm_block(block: nn.Module) -> list[tuple[str, str]]:
    return [("norm1", "attn.qkv"), ("norm2", "mlp.fc1")]


def _swin_block(block: SwinTransformerBlock) -> list[tuple[str, str]]:
    # Swin pads windows with zeros *after* norm1 when the resolution is not a multiple of the window;
    # folding would change what those zeros mean, so norm1 is a region only when no padding occurs.
    height, width = block.input_resolution
    win_h, win_w = block.window_size
    pads = height % win_h or width % win_w or block.dynamic_mask
    return ([] if pads else [("norm1", "attn.qkv")]) + [("norm2", "mlp.fc1")]


def _patch_merging(block: PatchMerging) -> list[tuple[str, str]]:
    return [("norm", "reduction")]


_REGION_RULES: dict[type[nn.Module], RegionRule] = {
    Block: _pre_norm_block,
    SwinTransformerBlock: _swin_block,
    PatchMerging: _patch_merging,
}


def _mlp(mlp: Mlp) -> list[tuple[str, str]]:
    # A norm between the activation and fc2 (timm's scale_mlp_norm) would be the source instead.
    return [("act", "fc2")] if isinstance(mlp.norm, nn.Identity) else []


_ACTIVATION_RULES: dict[type[nn.Module], RegionRule] = {Mlp: _mlp}


def register_regions(block_cls: type[nn.Module], rule: RegionRule) -> None:
    """Declare the (norm, sink) child pairs of another block class, as paths relative to the block.

    The norm's output must be read by its sink alone: folds rewrite what it means, and at inference
    the sink quantizes it in place (``QuantLinear.input_owned``).
    """
    _REGION_RULES[block_cls] = rule


def register_activation_regions(block_cls: type[nn.Module], rule: RegionRule) -> None:
    """Declare the (elementwise activation, sink) child pairs of another block class.

    As for ``register_regions``, the activation's output must be read by its sink alone: at inference
    the sink overwrites it with its rotated and quantized input (``QuantLinear.input_owned``).
    """
    _ACTIVATION_RULES[block_cls] = rule


class RegionError(LrpqError):
    """A registered region whose modules do not have the shape folding needs."""


@dataclass(frozen=True)
class Region:
    """Full module names of a LayerNorm and the Linear that consumes its output."""

    norm: str
    sink: str


def _matching_pairs(model: nn.Module, rules: dict[type[nn.Module], RegionRule]) -> list[tuple[str, str, nn.Module]]:
    """(source name, sink name, source module) of every pair the rules declare, in module order."""
    pairs = []
    for block_name, block in model.named_modules():
        rule = rules.get(type(block))
        if rule is None:
            continue
        prefix = f"{block_name}." if block_name else ""
        for source_path, sink_path in rule(block):
            source, sink = block.get_submodule(source_path), block.get_submodule(sink_path)
            _check_sink(prefix + source_path, source, prefix + sink_path, sink)
            pairs.append((prefix + source_path, prefix + sink_path, source))
    return pairs


def find_regions(model: nn.Module) -> list[Region]:
    """All LayerNorm → Linear regions of ``model``, in module order, validated for folding."""
    regions = []
    for norm_name, sink_name, norm in _matching_pairs(model, _REGION_RULES):
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
            raise RegionError(f"'{norm_name}' is {type(norm).__name__}, expected a LayerNorm with weight and bias")
        regions.append(Region(norm_name, sink_name))
    return regions


def find_activation_sinks(model: nn.Module) -> list[str]:
    """Names of the Linears fed channel-for-channel by an elementwise activation (``mlp.fc2``), in order."""
    return [sink_name for _, sink_name, _ in _matching_pairs(model, _ACTIVATION_RULES)]


def _check_sink(source_name: str, source: nn.Module, sink_name: str, sink: nn.Module) -> None:
    if not isinstance(sink, nn.Linear):
        raise RegionError(f"'{sink_name}' is {type(sink).__name__}, expected a Linear after '{source_name}'")
    channels = source.normalized_shape[-1] if isinstance(source, nn.LayerNorm) else sink.in_features
    if channels != sink.in_features:
        raise RegionError(f"'{source_name}' has {channels} channels but '{sink_name}' takes {sink.in_features}")
