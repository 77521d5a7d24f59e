"""What a pruned model keeps, as data, and the surgery that cuts a timm model down to it.

A structure lists, per transformer block, the indices of the attention heads and MLP hidden channels
it keeps (in the unpruned block's numbering) and the unpruned sizes. It is all a model card needs
besides timm's own kwargs: ``timm.create_model(name, **kwargs)`` builds the unpruned architecture,
``apply_structure`` cuts it (any weights), and the pruned state dict then loads strictly. Blocks may
keep different numbers of heads and channels, which timm's kwargs cannot express.

The surgery removes a head's q, k and v rows from ``qkv`` and its columns from ``proj`` (and its
column of a Swin block's relative-position-bias table), and a hidden channel's ``fc1`` row and ``fc2``
column; ``num_heads`` and ``attn_dim`` follow, ``head_dim`` and the softmax scale stay. LayerScale acts
on the block's output width, which does not change. Only layouts where this removes the unit's
contribution exactly are accepted: a LayerNorm over the merged heads (``scale_norm``) or over the
hidden channels, or a gate, would mix units, and is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import LayerScale, Mlp
from timm.layers.attention import Attention
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block
from torch import nn

from lrpq.errors import LrpqError

FORMAT_VERSION = 1
BLOCK_TYPES = (Block, SwinTransformerBlock)
UNIT_KINDS = ("heads", "hidden")


class StructureError(LrpqError):
    """A model that cannot be pruned, or a pruned structure that does not fit a model."""


def kept_count(units: int, fraction: float) -> int:
    """Units a block keeps when ``fraction`` of them is removed: ⌈(1 − fraction)·units⌉, so at least one.

    Rounded at 9 decimals first so 0.7·10 is 7, not the 8 that ceil(7.000000000000001) would give.
    """
    if not 0.0 <= fraction < 1.0:
        raise StructureError(f"fraction {fraction} must be in [0, 1): a block keeps at least one unit")
    return max(1, math.ceil(round((1.0 - fraction) * units, 9)))


def _indices(values: Sequence[int], size: int, what: str) -> tuple[int, ...]:
    kept = tuple(int(v) for v in values)
    if not kept or list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= size:
        raise StructureError(f"{what} {list(kept)[:8]} must be increasing, unique, non-empty indices below {size}")
    return kept


@dataclass(frozen=True)
class BlockKeep:
    """The heads and hidden channels one block keeps, numbered as in the unpruned block of these sizes."""

    num_heads: int
    hidden_features: int
    heads: tuple[int, ...]
    hidden: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _indices(self.heads, self.num_heads, "kept heads"))
        object.__setattr__(self, "hidden", _indices(self.hidden, self.hidden_features, "kept hidden channels"))

    @classmethod
    def full(cls, num_heads: int, hidden_features: int) -> BlockKeep:
        return cls(num_heads, hidden_features, tuple(range(num_heads)), tuple(range(hidden_features)))

    def removed(self, kind: str) -> int:
        return (self.num_heads if kind == "heads" else self.hidden_features) - len(getattr(self, kind))

    def then(self, inner: BlockKeep) -> BlockKeep:
        """This block pruned again by ``inner`` (numbered in this block's kept units): original numbering."""
        if (inner.num_heads, inner.hidden_features) != (len(self.heads), len(self.hidden)):
            raise StructureError(
                f"a second pruning of a block with {len(self.heads)} heads and {len(self.hidden)} hidden channels "
                f"was given for {inner.num_heads} and {inner.hidden_features}"
            )
        heads = tuple(self.heads[i] for i in inner.heads)
        hidden = tuple(self.hidden[i] for i in inner.hidden)
        return BlockKeep(self.num_heads, self.hidden_features, heads, hidden)


@dataclass(frozen=True)
class PrunedStructure:
    """Per block name (as in ``model.named_modules()``): what the block keeps."""

    blocks: Mapping[str, BlockKeep]

    def to_json_dict(self) -> dict[str, Any]:
        blocks = {
            name: {
                "num_heads": keep.num_heads,
                "hidden_features": keep.hidden_features,
                "heads": list(keep.heads),
                "hidden": list(keep.hidden),
            }
            for name, keep in self.blocks.items()
        }
        return {"format": FORMAT_VERSION, "blocks": blocks}

    @classmethod
    def from_json_dict(cls, data: Any) -> PrunedStructure:
        try:
            if data["format"] != FORMAT_VERSION:
                raise StructureError(f"pruning format {data['format']!r} is not {FORMAT_VERSION}")
            blocks = {
                str(name): BlockKeep(int(b["num_heads"]), int(b["hidden_features"]), b["heads"], b["hidden"])
                for name, b in data["blocks"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise StructureError(f"not a pruned structure: {error!r}") from None
        return cls(blocks)

    def then(self, inner: PrunedStructure) -> PrunedStructure:
        """This structure pruned again by ``inner`` (which describes the already pruned model)."""
        if set(inner.blocks) != set(self.blocks):
            raise StructureError("a second pruning must name the same blocks as the first")
        return PrunedStructure({name: keep.then(inner.blocks[name]) for name, keep in self.blocks.items()})

    def is_identity(self) -> bool:
        return not any(keep.removed(kind) for keep in self.blocks.values() for kind in UNIT_KINDS)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per block: kept heads and hidden channels (what a summary shows)."""
        return {name: {"heads": len(keep.heads), "hidden": len(keep.hidden)} for name, keep in self.blocks.items()}


def _check_block(name: str, block: nn.Module) -> None:
    attn, mlp = block.attn, block.mlp
    if type(attn) not in (Attention, WindowAttention):
        raise StructureError(f"block '{name}' has attention {type(attn).__name__}; prunable are timm Attention/Swin")
    if type(attn) is Attention and (not isinstance(attn.norm, nn.Identity) or attn.gate is not None):
        raise StructureError(f"block '{name}': a norm or gate over the merged heads mixes heads; cannot prune them")
    if type(mlp) is not Mlp or type(mlp.fc1) is not nn.Linear or type(mlp.fc2) is not nn.Linear:
        raise StructureError(f"block '{name}' has MLP {type(mlp).__name__}; prunable is timm Mlp with Linear layers")
    if not isinstance(mlp.norm, nn.Identity):
        raise StructureError(f"block '{name}': a norm over the MLP hidden channels mixes them; cannot prune them")


def prunable_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Every ViT/DeiT/DINOv2 ``Block`` and Swin block by name, in forward order; checked for exact surgery."""
    blocks = {name: module for name, module in model.named_modules() if type(module) in BLOCK_TYPES}
    if not blocks:
        raise StructureError(f"{type(model).__name__} has no timm ViT/DeiT/Swin transformer blocks to prune")
    for name, block in blocks.items():
        _check_block(name, block)
    return blocks


def head_dim(attn: nn.Module) -> int:
    """Channels per head (Swin's WindowAttention does not store it)."""
    return attn.qkv.out_features // (3 * attn.num_heads)


def branch_scale(block: nn.Module, branch: str) -> torch.Tensor:
    """The per-channel factor of a branch's output on its way into the residual stream: LayerScale γ, else 1."""
    layer_scale = getattr(block, "ls1" if branch == "attn" else "ls2", None)
    width = block.attn.proj.out_features if branch == "attn" else block.mlp.fc2.out_features
    if isinstance(layer_scale, LayerScale):
        return layer_scale.gamma.detach()
    return torch.ones(width)


def unpruned(model: nn.Module) -> PrunedStructure:
    """The structure that keeps everything (pruning 0 %)."""
    return PrunedStructure(
        {
            name: BlockKeep.full(block.attn.num_heads, block.mlp.fc1.out_features)
            for name, block in prunable_blocks(model).items()
        }
    )


def head_channels(heads: Sequence[int], dim_per_head: int) -> torch.Tensor:
    """The merged-head channels (attn·v output, proj input) of ``heads``."""
    return (torch.tensor(heads).unsqueeze(1) * dim_per_head + torch.arange(dim_per_head)).reshape(-1)


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[rows].clone(), linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone(), linear.bias.requires_grad)
    linear.out_features = len(rows)


def _keep_columns(linear: nn.Linear, columns: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[:, columns].clone(), linear.weight.requires_grad)
    linear.in_features = len(columns)


def _prune_heads(attn: nn.Module, heads: tuple[int, ...]) -> None:
    dim_per_head, attn_dim = head_dim(attn), attn.qkv.out_features // 3
    channels = head_channels(heads, dim_per_head)
    _keep_rows(attn.qkv, torch.cat([channels + part * attn_dim for part in range(3)]))  # q, k, v thirds
    _keep_columns(attn.proj, channels)
    if isinstance(attn, WindowAttention):
        table = attn.relative_position_bias_table
        attn.relative_position_bias_table = nn.Parameter(table.detach()[:, list(heads)].clone(), table.requires_grad)
    else:
        attn.attn_dim = len(heads) * dim_per_head
    attn.num_heads = len(heads)


def _prune_hidden(mlp: Mlp, hidden: tuple[int, ...]) -> None:
    channels = torch.tensor(hidden)
    _keep_rows(mlp.fc1, channels)
    _keep_columns(mlp.fc2, channels)


@torch.no_grad()
def apply_structure(model: nn.Module, structure: PrunedStructure) -> nn.Module:
    """Cut ``model`` (unpruned, as timm builds it) down to ``structure``, in place; returns ``model``."""
    blocks = prunable_blocks(model)
    unknown = sorted(set(structure.blocks) - set(blocks))
    if unknown:
        raise StructureError(f"the pruned structure names blocks this model does not have: {', '.join(unknown[:3])}")
    for name, keep in structure.blocks.items():
        block = blocks[name]
        sizes = (block.attn.num_heads, block.mlp.fc1.out_features)
        if sizes != (keep.num_heads, keep.hidden_features):
            raise StructureError(
                f"block '{name}' has {sizes[0]} heads and {sizes[1]} hidden channels, but the structure was made "
                f"for {keep.num_heads} and {keep.hidden_features}; build the unpruned model with the card's kwargs"
            )
        if keep.removed("heads"):
            _prune_heads(block.attn, keep.heads)
        if keep.removed("hidden"):
            _prune_hidden(block.mlp, keep.hidden)
    return model
