"""Layer-wise relevance propagation on unmodified timm ViT, DeiT and Swin models (LRP-QViT, Sec. 3).

LRP-QViT gives more bits to the layers that carry more of the evidence for the predicted class.
That evidence is measured with Chefer et al.'s relevance rules (CVPR 2021): z⁺ through Linear and
Conv layers, identity through GELU/softmax/LayerNorm/dropout/LayerScale, a gradient×input split of
q·kᵀ and attn·v and of residual adds, renormalised so each pair conserves relevance, and sums where
a tensor fans out. A layer's contribution for one image is LRP-QViT's ``mean((∇A ⊙ R)⁺)`` over its
output ``A`` (``layer_contribution``), where ``∇A`` is the target logit's gradient from the same pass
and ``R`` the relevance there: the positive part of the product, so an element whose gradient and
relevance are both negative counts too. The q·kᵀ layer is scored on the post-softmax attention, its
``(∇A ⊙ R)⁺`` averaged over heads being Chefer's attention map; a layer's score is the mean
contribution over images, normalised within its block by the allocators.

Nothing in the model is replaced: a context manager records every submodule's inputs and outputs
with forward hooks (and switches attention to its explicit q·kᵀ → softmax → ·v path), the rules
walk the known block structure backwards over those records, and everything is undone on exit.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, LayerScale, Mlp, PatchDropout, PatchEmbed
from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool, SelectAdaptivePool2d
from timm.layers.attention import Attention
from timm.layers.classifier import ClassifierHead
from timm.layers.drop import DropPath
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerStage,
    WindowAttention,
)
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from tqdm.auto import tqdm

from lrpq.allocation.solvers import relative_importance
from lrpq.errors import LrpqError
from lrpq.ranking import kendall_tau

# Stabiliser of every relevance ratio, as in Chefer et al.'s safe_divide.
EPSILON = 1e-9
# Module types whose enclosing block gives their layers a block name; layers outside any are "head".
_BLOCK_TYPES = (Block, SwinTransformerBlock, PatchMerging, PatchEmbed)
_HEAD_BLOCK = "head"


class RelevanceError(LrpqError):
    """A model, image batch, target or score file that relevance propagation cannot work with."""


# --- elementary rules -------------------------------------------------------------------------


def safe_divide(numerator: Tensor, denominator: Tensor, eps: float = EPSILON) -> Tensor:
    """numerator / denominator pushed away from zero by ``eps``; 0 where the denominator is exactly 0.

    Relevance ratios R/z blow up where a pre-activation z is tiny; the stabiliser bounds them and
    the zero case drops relevance that no input produced.
    """
    stabilised = torch.copysign(denominator.new_tensor(eps), denominator).add_(denominator)
    return torch.div(numerator, stabilised).masked_fill_(denominator == 0, 0.0)


def zplus_relevance(op: Callable[[Tensor, Tensor], Tensor], x: Tensor, weight: Tensor, r: Tensor) -> Tensor:
    """z⁺ (α1β0) rule for a linear map ``op(x, weight)``: only the positive terms x·w share relevance.

    Positive terms are x⁺w⁺ and x⁻w⁻; each input receives its share of R/z along them. The bias is
    left out so the rule conserves: sum(result) == sum(r) wherever z > 0.
    """
    x, weight = x.detach(), weight.detach()
    with torch.enable_grad():
        pos_x = x.clamp(min=0).requires_grad_()
        neg_x = x.clamp(max=0).requires_grad_()
        z = op(pos_x, weight.clamp(min=0)) + op(neg_x, weight.clamp(max=0))
        grad_pos, grad_neg = torch.autograd.grad(z, (pos_x, neg_x), safe_divide(r, z.detach()))
    return pos_x.detach() * grad_pos + neg_x.detach() * grad_neg


def zplus_linear(x: Tensor, weight: Tensor, r: Tensor) -> Tensor:
    """``zplus_relevance`` of ``F.linear`` with its two vector-Jacobian products written out.

    The input gradients of ``x⁺W⁺ᵀ + x⁻W⁻ᵀ`` are ``(R/z)·W⁺`` and ``(R/z)·W⁻``, so no autograd graph
    is built; the same four products, on buffers this function owns and reuses in place.
    """
    x, weight = x.detach(), weight.detach()
    pos_w, neg_w = weight.clamp(min=0), weight.clamp(max=0)
    pos_x, neg_x = x.clamp(min=0), x.clamp(max=0)
    s = safe_divide(r, F.linear(pos_x, pos_w).add_(F.linear(neg_x, neg_w)))
    return pos_x.mul_(s @ pos_w).add_(neg_x.mul_(s @ neg_w))


def _per_sample_sum(t: Tensor) -> Tensor:
    """(B,) sums over everything but the leading dimension."""
    return t.reshape(t.shape[0], -1).sum(1)


def _per_sample_scale(t: Tensor, scale: Tensor) -> Tensor:
    return t * scale.view(-1, *[1] * (t.ndim - 1))


def _conserving_pair(a: Tensor, b: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale two operands' relevances so together they hold exactly sum(r), split by |sum| share.

    Gradient×input gives each operand of a bilinear product the full relevance (2R in total) and
    the operands of an add an unbounded one when they nearly cancel; this is Chefer's Add fix.
    """
    a_sum, b_sum, total = _per_sample_sum(a), _per_sample_sum(b), _per_sample_sum(r)
    share = a_sum.abs() + b_sum.abs()
    a_target = safe_divide(a_sum.abs(), share) * total
    b_target = safe_divide(b_sum.abs(), share) * total
    return (
        _per_sample_scale(a, safe_divide(a_target, a_sum)),
        _per_sample_scale(b, safe_divide(b_target, b_sum)),
    )


def add_relevance(a: Tensor, b: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Split the relevance of ``a + b`` between its operands (gradient×input, then conserved)."""
    s = safe_divide(r, a + b)
    return _conserving_pair(a * s, b * s, r)


def matmul_relevance(a: Tensor, b: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Split the relevance of ``a @ b`` between its operands (gradient×input, then conserved)."""
    s = safe_divide(r, a @ b)
    return _conserving_pair(a * (s @ b.transpose(-2, -1)), b * (a.transpose(-2, -1) @ s), r)


def layer_contribution(grad: Tensor, relevance: Tensor, images: int) -> Tensor:
    """LRP-QViT's per-image contribution of a layer: ``mean((∇A ⊙ R)⁺)`` over its output ``A``, shape (images,).

    The positive part is taken of the product, not of ``R`` first: an element whose gradient and
    relevance are both negative supports the prediction as much as one where both are positive.
    ``A`` leads with the image dimension, or with images × windows (Swin's attention), image-major.
    """
    return (grad * relevance).clamp(min=0).reshape(images, -1).mean(1).detach()


def clone_relevance(*relevances: Tensor) -> Tensor:
    """A tensor read by several consumers gets the sum of the relevance each consumer hands back.

    Added one by one (for two, bit for bit the stacked sum): stacking copied every operand first, 5 % of
    ref-B's relevance time.
    """
    total = relevances[0]
    for relevance in relevances[1:]:
        total = total + relevance
    return total


def _move(source: Tensor, moved: Tensor, r: Tensor) -> Tensor:
    """Carry relevance on ``moved`` back to ``source`` through ops that only move elements.

    Reshape, roll, pad and window partition are 0/1 linear maps, so their vector-Jacobian product
    is the exact inverse placement; the recorded autograd graph supplies it without re-deriving it.
    """
    return torch.autograd.grad(moved, source, r, retain_graph=True)[0]


# --- capture ----------------------------------------------------------------------------------


@dataclass
class RelevanceTrace:
    """Inputs and output of every submodule's latest call, still attached to the autograd graph."""

    inputs: dict[nn.Module, tuple[Any, ...]] = field(default_factory=dict)
    outputs: dict[nn.Module, Any] = field(default_factory=dict)

    def record(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.inputs[module] = args
        self.outputs[module] = output


@contextmanager
def relevance_trace(model: nn.Module) -> Iterator[RelevanceTrace]:
    """Record every submodule in eval mode with explicit attention; restore hooks, modes on exit.

    Fused attention never materialises q·kᵀ or the attention probabilities, so it is switched off
    on each attention instance for the duration; training flags are restored module by module.
    """
    trace = RelevanceTrace()
    training = {module: module.training for module in model.modules()}
    attentions = [m for m in model.modules() if isinstance(m, (Attention, WindowAttention))]
    fused = {module: module.fused_attn for module in attentions}
    handles = []
    try:
        model.eval()
        for module in attentions:
            module.fused_attn = False
        for module in model.modules():
            handles.append(module.register_forward_hook(trace.record))
        yield trace
    finally:
        for handle in handles:
            handle.remove()
        for module, value in fused.items():
            module.fused_attn = value
        for module, value in training.items():
            module.training = value


# --- propagation ------------------------------------------------------------------------------


@dataclass
class _Point:
    """A scored tensor (in the autograd graph, for its gradient) and its relevance in the same layout."""

    name: str
    activation: Tensor
    relevance: Tensor


Rule = Callable[[nn.Module, Tensor, "_Propagation"], Tensor]


class _Propagation:
    """One backward relevance pass over a recorded forward pass; collects the scored tensors."""

    def __init__(self, trace: RelevanceTrace, names: dict[nn.Module, str]) -> None:
        self.trace, self.names = trace, names
        self.points: list[_Point] = []
        self.attention: list[tuple[str, Tensor, Tensor]] = []

    def input(self, module: nn.Module) -> Tensor:
        return self.trace.inputs[module][0]

    def output(self, module: nn.Module) -> Tensor:
        return self.trace.outputs[module]

    def propagate(self, module: nn.Module, r: Tensor) -> Tensor:
        """Relevance at ``module``'s input from relevance at its output, by the rule for its type."""
        rule = _RULES.get(type(module))
        if rule is None:
            raise RelevanceError(_unsupported_message(module, self.names.get(module, "?")))
        return rule(module, r, self)

    def chain(self, r: Tensor, *modules: nn.Module) -> Tensor:
        """Propagate through ``modules``, given last-to-first (the order relevance flows)."""
        for module in modules:
            r = self.propagate(module, r)
        return r

    def score(self, name: str, activation: Tensor, r: Tensor) -> None:
        """Keep ``activation`` (graph tensor) and its relevance ``r`` for the layer score ``name``."""
        self.points.append(_Point(name, activation, r))

    def attention_map(self, name: str, probs: Tensor, r: Tensor) -> None:
        """Keep an attention module's probabilities and their relevance for Chefer's attribution map."""
        self.attention.append((name, probs, r))

    def finish(self, target_logit: Tensor, batch: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per-image layer contributions and head-averaged attention relevance, in forward order.

        A contribution is ``layer_contribution`` of a scored tensor; an attention relevance is
        Chefer's E_h[(∇A ⊙ R_A)⁺] of one attention module.
        """
        tensors = [point.activation for point in self.points] + [probs for _, probs, _ in self.attention]
        grads = torch.autograd.grad(target_logit, tensors)
        point_grads, attention_grads = grads[: len(self.points)], grads[len(self.points) :]
        contributions = {
            point.name: layer_contribution(grad, point.relevance, batch)
            for point, grad in zip(reversed(self.points), reversed(point_grads), strict=True)
        }
        attention = {
            name: (grad * r).clamp(min=0).mean(1).detach()
            for (name, _, r), grad in zip(reversed(self.attention), reversed(attention_grads), strict=True)
        }
        return contributions, attention


def _unsupported_message(module: nn.Module, name: str) -> str:
    return (
        f"relevance propagation does not support {type(module).__name__} (module '{name}'); "
        "supported are timm VisionTransformer, VisionTransformerDistilled and SwinTransformer"
    )


def _identity_rule(module: nn.Module, r: Tensor, ctx: _Propagation) -> Tensor:
    """Elementwise maps (norms, activations, dropout, LayerScale) and flattens pass relevance on."""
    return r.reshape(ctx.input(module).shape)


def _sequential_rule(seq: nn.Sequential, r: Tensor, ctx: _Propagation) -> Tensor:
    return ctx.chain(r, *reversed(list(seq)))


def _linear_rule(linear: nn.Linear, r: Tensor, ctx: _Propagation) -> Tensor:
    ctx.score(ctx.names[linear], ctx.output(linear), r)
    return zplus_linear(ctx.input(linear), linear.weight, r)


def _conv_rule(conv: nn.Conv2d, r: Tensor, ctx: _Propagation) -> Tensor:
    ctx.score(ctx.names[conv], ctx.output(conv), r)

    def op(x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    return zplus_relevance(op, ctx.input(conv), conv.weight, r)


def _mean_pool_relevance(x: Tensor, r: Tensor, dims: int | Sequence[int]) -> Tensor:
    """z⁺ rule of a mean over ``dims``: positive inputs share each output's relevance by size."""
    pos = x.clamp(min=0)
    total = pos.sum(dims, keepdim=True)
    return pos * safe_divide(r.reshape(total.shape), total)


def _avg_pool_rule(pool: FastAdaptiveAvgPool, r: Tensor, ctx: _Propagation) -> Tensor:
    return _mean_pool_relevance(ctx.input(pool), r, pool.dim)


def _select_pool_rule(pool: SelectAdaptivePool2d, r: Tensor, ctx: _Propagation) -> Tensor:
    return ctx.chain(r, pool.flatten, pool.pool)


def _classifier_head_rule(head: ClassifierHead, r: Tensor, ctx: _Propagation) -> Tensor:
    return ctx.chain(r, head.flatten, head.fc, head.drop, head.global_pool)


def _mlp_rule(mlp: Mlp, r: Tensor, ctx: _Propagation) -> Tensor:
    return ctx.chain(r, mlp.drop2, mlp.fc2, mlp.norm, mlp.drop1, mlp.act, mlp.fc1)


def _split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3·H·d) → q, k, v of shape (B, H, N, d), as timm's attention lays them out."""
    batch, tokens, _ = qkv.shape
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _merge_heads(r_q: Tensor, r_k: Tensor, r_v: Tensor) -> Tensor:
    """Inverse of _split_heads for the relevance of q, k and v."""
    r = torch.stack((r_q, r_k, r_v)).permute(1, 3, 0, 2, 4)
    return r.reshape(r.shape[0], r.shape[1], -1)


def _attention_core(
    attn: Attention | WindowAttention,
    r_heads: Tensor,
    heads_out: Tensor,
    operands: tuple[Tensor, Tensor, Tensor],
    ctx: _Propagation,
) -> Tensor:
    """From relevance at the merged head outputs (attn·v) to relevance at the qkv output.

    Softmax, the relative-position bias and the shift mask pass relevance on unchanged; matmul1 is
    scored on the post-softmax attention (Chefer's map, as LRP-QViT scores the attention layer),
    matmul2 on the merged head outputs.
    """
    q, k, v = operands
    name = ctx.names[attn]
    ctx.score(f"{name}.matmul2", heads_out, r_heads)
    batch, tokens, _ = r_heads.shape
    r_mixed = r_heads.reshape(batch, tokens, attn.num_heads, -1).transpose(1, 2)
    probs = ctx.output(attn.attn_drop)
    r_probs, r_v = matmul_relevance(probs, v, r_mixed)
    ctx.score(f"{name}.matmul1", probs, r_probs)
    ctx.attention_map(name, probs, r_probs)
    r_q, r_kt = matmul_relevance(q * attn.scale, k.transpose(-2, -1), r_probs)
    return ctx.propagate(attn.qkv, _merge_heads(r_q, r_kt.transpose(-2, -1), r_v))


def _vit_attention_rule(attn: Attention, r: Tensor, ctx: _Propagation) -> Tensor:
    if getattr(attn, "gate", None) is not None:
        raise RelevanceError(f"gated attention (module '{ctx.names[attn]}') is not supported")
    r = ctx.chain(r, attn.proj_drop, attn.proj, attn.norm)
    _, _, v = _split_heads(ctx.output(attn.qkv), attn.num_heads)
    operands = (ctx.output(attn.q_norm), ctx.output(attn.k_norm), v)
    return _attention_core(attn, r, ctx.input(attn.norm), operands, ctx)


def _window_attention_rule(attn: WindowAttention, r: Tensor, ctx: _Propagation) -> Tensor:
    r = ctx.chain(r, attn.proj_drop, attn.proj)
    operands = _split_heads(ctx.output(attn.qkv), attn.num_heads)
    return _attention_core(attn, r, ctx.input(attn.proj), operands, ctx)


def _residual(skip: Tensor, branch_out: Tensor, r: Tensor, branch: Callable[[Tensor], Tensor]) -> Tensor:
    """x + f(x): split r at the add, push the branch share through f, sum at the clone of x."""
    r_skip, r_branch = add_relevance(skip, branch_out, r.reshape(skip.shape))
    return clone_relevance(r_skip, branch(r_branch))


def _vit_block_rule(blk: Block, r: Tensor, ctx: _Propagation) -> Tensor:
    def mlp_branch(r: Tensor) -> Tensor:
        return ctx.chain(r, blk.drop_path2, blk.ls2, blk.mlp, blk.norm2)

    def attention_branch(r: Tensor) -> Tensor:
        return ctx.chain(r, blk.drop_path1, blk.ls1, blk.attn, blk.norm1)

    r = _residual(ctx.input(blk.norm2), ctx.output(blk.drop_path2), r, mlp_branch)
    return _residual(ctx.input(blk.norm1), ctx.output(blk.drop_path1), r, attention_branch)


def _swin_block_rule(blk: SwinTransformerBlock, r: Tensor, ctx: _Propagation) -> Tensor:
    def mlp_branch(r: Tensor) -> Tensor:
        return ctx.chain(r, blk.drop_path2, blk.mlp, blk.norm2)

    def attention_branch(r: Tensor) -> Tensor:
        """Undo the window reverse/roll to reach the attention output, then the roll/partition before it."""
        r = _move(ctx.output(blk.attn), ctx.input(blk.drop_path1), ctx.propagate(blk.drop_path1, r))
        r = _move(ctx.output(blk.norm1), ctx.input(blk.attn), ctx.propagate(blk.attn, r))
        return ctx.propagate(blk.norm1, r)

    r = _residual(ctx.input(blk.norm2), ctx.output(blk.drop_path2), r, mlp_branch)
    return _residual(ctx.input(blk.norm1), ctx.output(blk.drop_path1), r, attention_branch)


def _swin_stage_rule(stage: SwinTransformerStage, r: Tensor, ctx: _Propagation) -> Tensor:
    return ctx.chain(r, stage.blocks, stage.downsample)


def _patch_merging_rule(merge: PatchMerging, r: Tensor, ctx: _Propagation) -> Tensor:
    r = ctx.chain(r, merge.reduction, merge.norm)
    return _move(ctx.input(merge), ctx.input(merge.norm), r)


def _patch_embed_rule(embed: PatchEmbed, r: Tensor, ctx: _Propagation) -> Tensor:
    r = _move(ctx.output(embed.proj), ctx.input(embed.norm), ctx.propagate(embed.norm, r))
    return _move(ctx.input(embed), ctx.input(embed.proj), ctx.propagate(embed.proj, r))


def _vit_pool_inverse(model: VisionTransformer, r: Tensor, ctx: _Propagation) -> Tensor:
    """Relevance on the final tokens from relevance on the pooled feature ('token' or 'avg')."""
    if model.attn_pool is not None or model.global_pool not in ("token", "avg"):
        raise RelevanceError(f"ViT pooling {model.global_pool!r} is not supported; use 'token' or 'avg'")
    tokens = ctx.output(model.norm)
    r_tokens = torch.zeros_like(tokens)
    if model.global_pool == "token":
        r_tokens[:, 0] = r
    else:
        start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
        r_tokens[:, start:] = _mean_pool_relevance(tokens[:, start:], r, 1)
    return r_tokens


def _vit_trunk(model: VisionTransformer, r_tokens: Tensor, ctx: _Propagation) -> Tensor:
    """From relevance on the final tokens back to the input pixels.

    At the position-embedding add, patch tokens keep their gradient×input share against the
    embedding; prefix tokens (cls, dist, registers) start from parameters, so, as in Chefer's
    'full' LRP, their relevance does not reach the pixels.
    """
    r = ctx.chain(r_tokens, model.norm, model.blocks, model.norm_pre, model.patch_drop)
    patches = ctx.output(model.patch_embed)
    flat = patches.reshape(patches.shape[0], -1, patches.shape[-1])
    r_patches = r[:, model.num_prefix_tokens :]
    if model.pos_embed is not None:  # pos_drop (dropout, identity) holds the sum patches + position
        with_position = ctx.input(model.pos_drop)[:, model.num_prefix_tokens :]
        r_patches, _ = add_relevance(flat, with_position - flat, r_patches)
    return ctx.propagate(model.patch_embed, r_patches.reshape(patches.shape))


def _vit_rule(model: VisionTransformer, r: Tensor, ctx: _Propagation) -> Tensor:
    r = ctx.chain(r, model.head, model.head_drop, model.fc_norm)
    return _vit_trunk(model, _vit_pool_inverse(model, r, ctx), ctx)


def _deit_distilled_rule(model: VisionTransformerDistilled, r: Tensor, ctx: _Propagation) -> Tensor:
    """Eval-mode DeiT logits are (head(cls) + head_dist(dist)) / 2: split r at that add first."""
    r_cls, r_dist = add_relevance(ctx.output(model.head) / 2, ctx.output(model.head_dist) / 2, r)
    r_dist = ctx.chain(r_dist, model.head_dist, model.head_drop)
    r_cls = ctx.chain(r_cls, model.head, model.head_drop)
    r_tokens = torch.zeros_like(ctx.output(model.norm))
    r_tokens[:, 0], r_tokens[:, 1] = r_cls, r_dist
    return _vit_trunk(model, r_tokens, ctx)


def _swin_rule(model: SwinTransformer, r: Tensor, ctx: _Propagation) -> Tensor:
    return ctx.chain(r, model.head, model.norm, model.layers, model.patch_embed)


_IDENTITY_TYPES = (
    nn.Identity,
    nn.Dropout,
    nn.GELU,
    nn.LayerNorm,
    nn.Flatten,
    LayerNorm,
    LayerScale,
    DropPath,
    PatchDropout,
)
_RULES: dict[type[nn.Module], Rule] = {
    **dict.fromkeys(_IDENTITY_TYPES, _identity_rule),
    nn.Sequential: _sequential_rule,
    nn.Linear: _linear_rule,
    nn.Conv2d: _conv_rule,
    FastAdaptiveAvgPool: _avg_pool_rule,
    SelectAdaptivePool2d: _select_pool_rule,
    ClassifierHead: _classifier_head_rule,
    Mlp: _mlp_rule,
    Attention: _vit_attention_rule,
    WindowAttention: _window_attention_rule,
    Block: _vit_block_rule,
    SwinTransformerBlock: _swin_block_rule,
    SwinTransformerStage: _swin_stage_rule,
    PatchMerging: _patch_merging_rule,
    PatchEmbed: _patch_embed_rule,
    VisionTransformer: _vit_rule,
    VisionTransformerDistilled: _deit_distilled_rule,
    SwinTransformer: _swin_rule,
}
# Used inside a supported parent whose rule accounts for them (WindowAttention's softmax).
_HANDLED_BY_PARENT = (nn.Softmax,)


def check_supported(model: nn.Module) -> None:
    """Raise RelevanceError naming the first submodule no rule covers, before any work is done."""
    for name, module in model.named_modules():
        if type(module) not in _RULES and type(module) not in _HANDLED_BY_PARENT:
            raise RelevanceError(_unsupported_message(module, name))


# --- explanation of one batch -----------------------------------------------------------------


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


def _as_batch(images: Any) -> Tensor:
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
    batch = _as_batch(images)
    names = {module: name for name, module in model.named_modules()}
    device = next(model.parameters()).device
    with relevance_trace(model) as trace, torch.enable_grad():
        x = batch.detach().to(device, torch.float32).clone().requires_grad_(True)
        logits = model(x)
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            raise RelevanceError("the model must return one (batch, classes) logits tensor")
        labels = _resolve_target(logits, target)
        one_hot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        ctx = _Propagation(trace, names)
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
    batch = _as_batch(image)
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


# --- layer scores -----------------------------------------------------------------------------


@dataclass
class LayerScores:
    """Per-layer LRP-QViT scores (mean contribution over images) and the block each layer is in."""

    scores: dict[str, float]
    block_of: dict[str, str]
    block_order: list[str]
    num_images: int

    def relative(self) -> dict[str, float]:
        """Score / block total; an all-zero block carries no preference, so it is shared equally."""
        return relative_importance(self.scores, self.block_of)

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> LayerScores:
        try:
            scores = {str(name): float(value) for name, value in data["scores"].items()}
            block_of = {str(name): str(block) for name, block in data["block_of"].items()}
            loaded = cls(scores, block_of, [str(b) for b in data["block_order"]], int(data["num_images"]))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise RelevanceError(f"not a layer-score file: {error!r}") from None
        loaded.check()
        return loaded

    def check(self) -> None:
        """Every scored layer has a finite score ≥ 0 and a block listed in ``block_order``."""
        for name, score in self.scores.items():
            if not (math.isfinite(score) and score >= 0):
                raise RelevanceError(f"layer {name!r} has score {score}; scores must be finite and >= 0")
            if self.block_of.get(name) not in self.block_order:
                raise RelevanceError(f"layer {name!r} has no block in block_order")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LayerScores:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise RelevanceError(f"cannot read layer scores from {path}: {error}") from None
        try:
            return cls.from_json_dict(data)
        except RelevanceError as error:
            raise RelevanceError(f"{path}: {error}") from None

    def save_csv(self, path: str | Path) -> None:
        relative = self.relative()
        with Path(path).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["layer", "block", "score", "relative"])
            for name, score in self.scores.items():
                writer.writerow([name, self.block_of[name], repr(score), repr(relative[name])])


@dataclass
class Contributions:
    """Per-image layer contributions: the raw material of LayerScores and of the convergence study."""

    names: list[str]
    block_of: dict[str, str]
    values: np.ndarray  # (images, layers)

    def to_scores(self) -> LayerScores:
        means = self.values.mean(0)
        block_order = list(dict.fromkeys(self.block_of[name] for name in self.names))
        scores = {name: float(value) for name, value in zip(self.names, means, strict=True)}
        return LayerScores(scores, dict(self.block_of), block_order, int(self.values.shape[0]))


def _batches(images: Tensor | Iterable[Any]) -> Iterator[Tensor]:
    if isinstance(images, Tensor):
        images = [images]
    for item in images:
        yield _as_batch(item)


def collect_contributions(
    model: nn.Module,
    images: Tensor | Iterable[Any],
    target: int | None = None,
    progress: bool = True,
    stop_tau: float | None = None,
    check_every: int = 10,
) -> Contributions:
    """Per-image contributions over ``images`` (batches, single images or (images, labels) pairs).

    With ``stop_tau``, every ``check_every`` images the running score ranking is compared with the
    one at the previous check; once Kendall's τ reaches ``stop_tau`` the remaining images are skipped.
    """
    rows: list[np.ndarray] = []
    names: list[str] = []
    block_of: dict[str, str] = {}
    previous: np.ndarray | None = None
    next_check = check_every
    with tqdm(desc="relevance", unit="img", disable=not progress) as bar:
        for batch in _batches(images):
            explanation = explain(model, batch, target)
            names, block_of = list(explanation.contributions), explanation.block_of
            rows.extend(torch.stack(list(explanation.contributions.values()), 1).double().cpu().numpy())
            bar.update(batch.shape[0])
            if stop_tau is None or len(rows) < next_check:
                continue
            current = np.mean(rows, 0)
            if previous is not None and kendall_tau(previous, current) >= stop_tau:
                break
            previous, next_check = current, len(rows) + check_every
    if not rows:
        raise RelevanceError("no images to compute relevance scores from")
    return Contributions(names, block_of, np.stack(rows))


def compute_layer_scores(
    model: nn.Module,
    images: Tensor | Iterable[Any],
    target: int | None = None,
    progress: bool = True,
    stop_tau: float | None = None,
    check_every: int = 10,
) -> LayerScores:
    """LRP-QViT layer scores of ``model`` over ``images``; see collect_contributions for the options."""
    return collect_contributions(model, images, target, progress, stop_tau, check_every).to_scores()


def ranking_stability(
    per_image: np.ndarray | Sequence[Sequence[float]], checkpoints: Iterable[int]
) -> list[tuple[int, float]]:
    """Kendall's τ between the score ranking of the first n images and that of all of them, per n."""
    values = np.asarray(per_image, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
        raise RelevanceError("per-image contributions must be a non-empty (images, layers) array")
    full = values.mean(0)
    result = []
    for n in checkpoints:
        if not 1 <= n <= values.shape[0]:
            raise RelevanceError(f"checkpoint {n} is outside 1..{values.shape[0]} images")
        result.append((n, kendall_tau(values[:n].mean(0), full)))
    return result
