"""The backward relevance pass over a recorded forward pass of a timm ViT, DeiT or Swin.

Nothing in the model is replaced: ``relevance_trace`` records every submodule's inputs and outputs
with forward hooks (and switches attention to its explicit q·kᵀ → softmax → ·v path), and
``Propagation`` walks the known block structure backwards over those records, one rule per module
type, keeping the tensors whose LRP-QViT contribution is scored. Everything is undone on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

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

from lrpq.errors import LrpqError
from lrpq.explicit_attention import explicit_attention
from lrpq.relevance.rules import (
    add_relevance,
    clone_relevance,
    layer_contribution,
    matmul_relevance,
    mean_pool_relevance,
    move_relevance,
    zplus_linear,
    zplus_relevance,
)


class RelevanceError(LrpqError):
    """A model, image batch, target or score file that relevance propagation cannot work with."""


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
    handles = []
    try:
        model.eval()
        for module in model.modules():
            handles.append(module.register_forward_hook(trace.record))
        with explicit_attention(attentions):
            yield trace
    finally:
        for handle in handles:
            handle.remove()
        for module, value in training.items():
            module.training = value


# --- propagation ------------------------------------------------------------------------------


@dataclass
class ScoredPoint:
    """A scored tensor (in the autograd graph, for its gradient) and its relevance in the same layout."""

    name: str
    activation: Tensor
    relevance: Tensor


Rule = Callable[[nn.Module, Tensor, "Propagation"], Tensor]


class Propagation:
    """One backward relevance pass over a recorded forward pass; collects the scored tensors."""

    def __init__(self, trace: RelevanceTrace, names: dict[nn.Module, str]) -> None:
        self.trace, self.names = trace, names
        self.points: list[ScoredPoint] = []
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
        self.points.append(ScoredPoint(name, activation, r))

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


def _identity_rule(module: nn.Module, r: Tensor, ctx: Propagation) -> Tensor:
    """Elementwise maps (norms, activations, dropout, LayerScale) and flattens pass relevance on."""
    return r.reshape(ctx.input(module).shape)


def _sequential_rule(seq: nn.Sequential, r: Tensor, ctx: Propagation) -> Tensor:
    return ctx.chain(r, *reversed(list(seq)))


def _linear_rule(linear: nn.Linear, r: Tensor, ctx: Propagation) -> Tensor:
    ctx.score(ctx.names[linear], ctx.output(linear), r)
    return zplus_linear(ctx.input(linear), linear.weight, r)


def _conv_rule(conv: nn.Conv2d, r: Tensor, ctx: Propagation) -> Tensor:
    ctx.score(ctx.names[conv], ctx.output(conv), r)

    def op(x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    return zplus_relevance(op, ctx.input(conv), conv.weight, r)


def _avg_pool_rule(pool: FastAdaptiveAvgPool, r: Tensor, ctx: Propagation) -> Tensor:
    return mean_pool_relevance(ctx.input(pool), r, pool.dim)


def _select_pool_rule(pool: SelectAdaptivePool2d, r: Tensor, ctx: Propagation) -> Tensor:
    return ctx.chain(r, pool.flatten, pool.pool)


def _classifier_head_rule(head: ClassifierHead, r: Tensor, ctx: Propagation) -> Tensor:
    return ctx.chain(r, head.flatten, head.fc, head.drop, head.global_pool)


def _mlp_rule(mlp: Mlp, r: Tensor, ctx: Propagation) -> Tensor:
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
    ctx: Propagation,
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


def _vit_attention_rule(attn: Attention, r: Tensor, ctx: Propagation) -> Tensor:
    if getattr(attn, "gate", None) is not None:
        raise RelevanceError(f"gated attention (module '{ctx.names[attn]}') is not supported")
    r = ctx.chain(r, attn.proj_drop, attn.proj, attn.norm)
    _, _, v = _split_heads(ctx.output(attn.qkv), attn.num_heads)
    operands = (ctx.output(attn.q_norm), ctx.output(attn.k_norm), v)
    return _attention_core(attn, r, ctx.input(attn.norm), operands, ctx)


def _window_attention_rule(attn: WindowAttention, r: Tensor, ctx: Propagation) -> Tensor:
    r = ctx.chain(r, attn.proj_drop, attn.proj)
    operands = _split_heads(ctx.output(attn.qkv), attn.num_heads)
    return _attention_core(attn, r, ctx.input(attn.proj), operands, ctx)


def _residual(skip: Tensor, branch_out: Tensor, r: Tensor, branch: Callable[[Tensor], Tensor]) -> Tensor:
    """x + f(x): split r at the add, push the branch share through f, sum at the clone of x."""
    r_skip, r_branch = add_relevance(skip, branch_out, r.reshape(skip.shape))
    return clone_relevance(r_skip, branch(r_branch))


def _vit_block_rule(blk: Block, r: Tensor, ctx: Propagation) -> Tensor:
    def mlp_branch(r: Tensor) -> Tensor:
        return ctx.chain(r, blk.drop_path2, blk.ls2, blk.mlp, blk.norm2)

    def attention_branch(r: Tensor) -> Tensor:
        return ctx.chain(r, blk.drop_path1, blk.ls1, blk.attn, blk.norm1)

    r = _residual(ctx.input(blk.norm2), ctx.output(blk.drop_path2), r, mlp_branch)
    return _residual(ctx.input(blk.norm1), ctx.output(blk.drop_path1), r, attention_branch)


def _swin_block_rule(blk: SwinTransformerBlock, r: Tensor, ctx: Propagation) -> Tensor:
    def mlp_branch(r: Tensor) -> Tensor:
        return ctx.chain(r, blk.drop_path2, blk.mlp, blk.norm2)

    def attention_branch(r: Tensor) -> Tensor:
        """Undo the window reverse/roll to reach the attention output, then the roll/partition before it."""
        r = move_relevance(ctx.output(blk.attn), ctx.input(blk.drop_path1), ctx.propagate(blk.drop_path1, r))
        r = move_relevance(ctx.output(blk.norm1), ctx.input(blk.attn), ctx.propagate(blk.attn, r))
        return ctx.propagate(blk.norm1, r)

    r = _residual(ctx.input(blk.norm2), ctx.output(blk.drop_path2), r, mlp_branch)
    return _residual(ctx.input(blk.norm1), ctx.output(blk.drop_path1), r, attention_branch)


def _swin_stage_rule(stage: SwinTransformerStage, r: Tensor, ctx: Propagation) -> Tensor:
    return ctx.chain(r, stage.blocks, stage.downsample)


def _patch_merging_rule(merge: PatchMerging, r: Tensor, ctx: Propagation) -> Tensor:
    r = ctx.chain(r, merge.reduction, merge.norm)
    return move_relevance(ctx.input(merge), ctx.input(merge.norm), r)


def _patch_embed_rule(embed: PatchEmbed, r: Tensor, ctx: Propagation) -> Tensor:
    r = move_relevance(ctx.output(embed.proj), ctx.input(embed.norm), ctx.propagate(embed.norm, r))
    return move_relevance(ctx.input(embed), ctx.input(embed.proj), ctx.propagate(embed.proj, r))


def _vit_pool_inverse(model: VisionTransformer, r: Tensor, ctx: Propagation) -> Tensor:
    """Relevance on the final tokens from relevance on the pooled feature ('token' or 'avg')."""
    if model.attn_pool is not None or model.global_pool not in ("token", "avg"):
        raise RelevanceError(f"ViT pooling {model.global_pool!r} is not supported; use 'token' or 'avg'")
    tokens = ctx.output(model.norm)
    r_tokens = torch.zeros_like(tokens)
    if model.global_pool == "token":
        r_tokens[:, 0] = r
    else:
        start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
        r_tokens[:, start:] = mean_pool_relevance(tokens[:, start:], r, 1)
    return r_tokens


def _vit_trunk(model: VisionTransformer, r_tokens: Tensor, ctx: Propagation) -> Tensor:
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


def _vit_rule(model: VisionTransformer, r: Tensor, ctx: Propagation) -> Tensor:
    r = ctx.chain(r, model.head, model.head_drop, model.fc_norm)
    return _vit_trunk(model, _vit_pool_inverse(model, r, ctx), ctx)


def _deit_distilled_rule(model: VisionTransformerDistilled, r: Tensor, ctx: Propagation) -> Tensor:
    """Eval-mode DeiT logits are (head(cls) + head_dist(dist)) / 2: split r at that add first."""
    r_cls, r_dist = add_relevance(ctx.output(model.head) / 2, ctx.output(model.head_dist) / 2, r)
    r_dist = ctx.chain(r_dist, model.head_dist, model.head_drop)
    r_cls = ctx.chain(r_cls, model.head, model.head_drop)
    r_tokens = torch.zeros_like(ctx.output(model.norm))
    r_tokens[:, 0], r_tokens[:, 1] = r_cls, r_dist
    return _vit_trunk(model, r_tokens, ctx)


def _swin_rule(model: SwinTransformer, r: Tensor, ctx: Propagation) -> Tensor:
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
