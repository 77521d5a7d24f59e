"""Relevance of one batch (``explain``) and of one image in pixel space (``relevance_map``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, SwinTransformerStage
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from lrpq.relevance.propagation import Propagation, RelevanceError, check_supported, relevance_trace

# Module types whose enclosing block gives their layers a block name; layers outside any are "head".
_BLOCK_TYPES = (Block, SwinTransformerBlock, PatchMerging, PatchEmbed)
_HEAD_BLOCK = "head"


@dataclass
class Explanation:
    """Relevance of one batch: per-image layer contributions and the input-pixel relevance."""

    target: Tensor  # (B,) class whose relevance was propagated
    logits: Tensor  # (B, classes)
    contributions: dict[str, Tensor]  # layer name → (B,) contribution
    attention: dict[str, Tensor]  # attention module name → (B or B·windows, N, N) E_h[(∇A ⊙ R_A)⁺]
    input_relevance: Tensor  # (B, C, H, W)
    block_of: dict[str, str]


def _fed_blocks(model: nn.Module) -> dict[str, str]:
    """Each Swin patch merging → the block its output feeds (the first of its stage).

    Scores are normalised within a block; a merging alone in its block would always have relative
    importance 1.0, so it is compared with the layers of the block it hands its tokens to.
    """
    names = {module: name for name, module in model.named_modules()}
    return {
        names[stage.downsample]: names[stage.blocks[0]]
        for stage in model.modules()
        if isinstance(stage, SwinTransformerStage) and isinstance(stage.downsample, PatchMerging) and len(stage.blocks)
    }


def block_of_layers(names: Iterable[str], model: nn.Module) -> dict[str, str]:
    """Each scored layer's block: its nearest enclosing block module, else the classifier 'head'.

    A Swin patch merging's reduction belongs to the block it feeds (``_fed_blocks``).
    """
    blocks = [name for name, module in model.named_modules() if isinstance(module, _BLOCK_TYPES)]
    fed = _fed_blocks(model)
    result = {}
    for name in names:
        owner = max((b for b in blocks if name.startswith(f"{b}.")), key=len, default=_HEAD_BLOCK)
        result[name] = fed.get(owner, owner)
    return result


def as_image_batch(images: Any) -> Tensor:
    """(C,H,W) or (B,C,H,W) tensor, or an (images, labels) pair whose labels are ignored."""
    if isinstance(images, (tuple, list)) and images and isinstance(images[0], Tensor):
        images = images[0]
    if not isinstance(images, Tensor) or images.ndim not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise RelevanceError(f"expected an image tensor (C,H,W) or batch (B,C,H,W), got {shape}")
    return images.unsqueeze(0) if images.ndim == 3 else images


def _resolve_target(logits: Tensor, target: int | Tensor | None) -> Tensor:
    """Per-image class index: the prediction, one class for all, or one label per image."""
    if target is None:
        return logits.argmax(1)
    labels = torch.as_tensor(target, device=logits.device).long().expand(logits.shape[0])
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise RelevanceError(f"target {target!r} is not a class index of a {logits.shape[1]}-class model")
    return labels


def explain(model: nn.Module, images: Tensor, target: int | Tensor | None = None) -> Explanation:
    """Run relevance propagation for one batch from a one-hot target (default: the predicted class)."""
    check_supported(model)
    batch = as_image_batch(images)
    names = {module: name for name, module in model.named_modules()}
    device = next(model.parameters()).device
    with relevance_trace(model) as trace, torch.enable_grad():
        x = batch.detach().to(device, torch.float32).clone().requires_grad_(True)
        logits = model(x)
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            raise RelevanceError("the model must return one (batch, classes) logits tensor")
        labels = _resolve_target(logits, target)
        one_hot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        ctx = Propagation(trace, names)
        with torch.no_grad():
            r_input = ctx.propagate(model, one_hot)
        contributions, attention = ctx.finish((logits * one_hot).sum(), x.shape[0])
    block_of = block_of_layers(contributions, model)
    return Explanation(labels, logits.detach(), contributions, attention, r_input.detach(), block_of)


def _attribution(model: nn.Module, explanation: Explanation, size: tuple[int, int]) -> Tensor:
    """Chefer et al.'s map: class-token row of the rollout ∏(I + Ā) over patch tokens, upsampled."""
    if not isinstance(model, VisionTransformer) or model.global_pool != "token":
        kind = type(model).__name__
        raise RelevanceError(f"method='attribution' needs a class-token ViT or DeiT, not {kind}; use 'lrp'")
    cams = list(explanation.attention.values())
    rollout = torch.eye(cams[0].shape[-1], dtype=cams[0].dtype, device=cams[0].device).expand_as(cams[0])
    for cam in cams:
        rollout = rollout + cam @ rollout
    patch_h, patch_w = model.patch_embed.patch_size
    grid = rollout[:, 0, model.num_prefix_tokens :].reshape(-1, 1, size[0] // patch_h, size[1] // patch_w)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0]


MAP_METHODS = ("lrp", "attribution")


def relevance_map(model: nn.Module, image: Tensor, target: int | None = None, method: str = "lrp") -> Tensor:
    """(H, W) relevance of one image in input-pixel space, negatives removed, scaled to [0, 1].

    ``lrp`` is the channel sum of the relevance LRP delivers to the pixels (Chefer's 'full' LRP);
    ``attribution`` is Chefer's gradient-weighted attention rollout, which on DINOv2-style models
    is far less dominated by a few high-norm background tokens (class-token ViT/DeiT only).
    """
    if method not in MAP_METHODS:
        raise RelevanceError(f"method={method!r} is unknown; use one of: {', '.join(MAP_METHODS)}")
    batch = as_image_batch(image)
    if batch.shape[0] != 1:
        raise RelevanceError(f"relevance_map takes one image, got a batch of {batch.shape[0]}")
    explanation = explain(model, batch, target)
    if method == "lrp":
        heat = explanation.input_relevance[0].sum(0)
    else:
        heat = _attribution(model, explanation, tuple(batch.shape[-2:]))
    heat = heat.clamp(min=0)
    peak = heat.max()
    return heat / peak if peak > 0 else heat
