"""LayerNorm → sink regions, found from the module structure.

A region is a LayerNorm whose output feeds exactly one Linear channel-for-channel (timm's pre-norm
blocks: ``norm1 → attn.qkv``, ``norm2 → mlp.fc1``; Swin ``PatchMerging``: ``norm → reduction``).
Per-channel factors can then be folded out of the activation into the norm's affine and the sink's
weights. Which children form a region is a property of the block class, registered below; nothing
is selected by matching substrings of module names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


def register_regions(block_cls: type[nn.Module], rule: RegionRule) -> None:
    """Declare the (norm, sink) child pairs of another block class, as paths relative to the block."""
    _REGION_RULES[block_cls] = rule


class RegionError(LrpqError):
    """A registered region whose modules do not have the shape folding needs."""


@dataclass(frozen=True)
class Region:
    """Full module names of a LayerNorm and the Linear that consumes its output."""

    norm: str
    sink: str


def find_regions(model: nn.Module) -> list[Region]:
    """All LayerNorm → Linear regions of ``model``, in module order, validated for folding."""
    regions = []
    for block_name, block in model.named_modules():
        rule = _REGION_RULES.get(type(block))
        if rule is None:
            continue
        prefix = f"{block_name}." if block_name else ""
        for norm_path, sink_path in rule(block):
            norm, sink = block.get_submodule(norm_path), block.get_submodule(sink_path)
            _check_foldable(prefix + norm_path, norm, prefix + sink_path, sink)
            regions.append(Region(prefix + norm_path, prefix + sink_path))
    return regions


def _check_foldable(norm_name: str, norm: nn.Module, sink_name: str, sink: nn.Module) -> None:
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
        raise RegionError(f"'{norm_name}' is {type(norm).__name__}, expected a LayerNorm with weight and bias")
    if not isinstance(sink, nn.Linear):
        raise RegionError(f"'{sink_name}' is {type(sink).__name__}, expected a Linear after '{norm_name}'")
    if norm.normalized_shape[-1] != sink.in_features:
        raise RegionError(
            f"'{norm_name}' has {norm.normalized_shape[-1]} channels but '{sink_name}' takes {sink.in_features}"
        )
