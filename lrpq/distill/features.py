"""What a model's forward hands to the distillation losses, and how to record it from a timm model.

The same capture serves the float teacher and the fake-quantized student: it hooks modules that both
share (the blocks, each block's ``attn.attn_drop`` and the classifier), so lrpq's ``QuantAttention`` and
``QuantWindowAttention`` are recorded exactly like timm's ``Attention`` and ``WindowAttention``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lrpq.errors import LrpqError
from lrpq.explicit_attention import explicit_attention


class DistillError(LrpqError):
    """A loss asked for something the features or the model cannot give (no index, unknown block, …)."""


@dataclass
class DistillFeatures:
    """One forward's worth of features for distillation; the student's keep their autograd graph.

    ``tokens[i]``: output of block ``i`` as (B, N, D), tokens on the spatial axis (Swin's (B, H, W, C) is
    flattened to (B, H·W, C)); ``attention[i]``: post-softmax probabilities of block ``i`` as (B, heads, N, N)
    (Swin: (B, windows·heads, window area, window area)), empty when not captured; ``embedding``: the
    pre-logits feature (B, D); ``index``: each sample's position in the calibration set (CRD's memory).
    """

    logits: torch.Tensor
    tokens: list[torch.Tensor]
    embedding: torch.Tensor
    attention: list[torch.Tensor] = field(default_factory=list)
    index: torch.Tensor | None = None

    def detach(self) -> DistillFeatures:
        """The same features cut from the graph: what every loss does to the teacher before using it."""
        return DistillFeatures(
            logits=self.logits.detach(),
            tokens=[t.detach() for t in self.tokens],
            embedding=self.embedding.detach(),
            attention=[a.detach() for a in self.attention],
            index=self.index,
        )


@dataclass(frozen=True)
class FeatureShapes:
    """The widths a loss needs to size its learnable parts (student and teacher have the same ones)."""

    embed_dim: int
    tokens: tuple[tuple[int, int], ...]  # (N, D) of each block's output
    num_images: int | None = None  # size of the calibration set, for CRD's memory

    @classmethod
    def of(cls, features: DistillFeatures, num_images: int | None = None) -> FeatureShapes:
        return cls(
            embed_dim=features.embedding.shape[-1],
            tokens=tuple((t.shape[1], t.shape[2]) for t in features.tokens),
            num_images=num_images,
        )

    @property
    def num_blocks(self) -> int:
        return len(self.tokens)


def resolve_blocks(blocks: Sequence[int] | None, num_blocks: int) -> tuple[int, ...]:
    """Block indices made non-negative (Python-style: ``-1`` is the last block; None is every block)."""
    if blocks is None:
        return tuple(range(num_blocks))
    if not blocks:
        raise DistillError("no blocks selected")
    for block in blocks:
        if not -num_blocks <= block < num_blocks:
            raise DistillError(f"block {block} does not exist: the model has {num_blocks} blocks")
    return tuple(block % num_blocks for block in blocks)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks in forward order: ViT/DeiT ``blocks[i]``, Swin ``layers[s].blocks[j]``."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList):
        return list(blocks)
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.Sequential | nn.ModuleList) and all(hasattr(layer, "blocks") for layer in layers):
        return [block for layer in layers for block in layer.blocks]
    raise DistillError(f"{type(model).__name__} has neither ViT 'blocks' nor Swin 'layers[s].blocks' to record")


def _classifiers(model: nn.Module) -> tuple[nn.Module, ...]:
    """The final classifier(s); a distilled DeiT has two, whose inputs average to its pre-logits."""
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        raise DistillError(f"{type(model).__name__} has no get_classifier() to find its pre-logits feature")
    classifier = get_classifier()
    return tuple(classifier) if isinstance(classifier, tuple) else (classifier,)


class FeatureCapture:
    """Filled by the hooks of ``capture_features``; ``features`` is the bundle of the latest forward."""

    def __init__(self, num_blocks: int, num_classifiers: int) -> None:
        self._num_blocks = num_blocks
        self._num_classifiers = num_classifiers
        self._batch = 0
        self._tokens: list[torch.Tensor] = []
        self._attention: list[torch.Tensor] = []
        self._head_inputs: list[torch.Tensor] = []
        self._features: DistillFeatures | None = None

    @property
    def features(self) -> DistillFeatures:
        if self._features is None:
            raise DistillError("no forward pass ran inside capture_features")
        return self._features

    def start(self, _module: nn.Module, args: tuple) -> None:
        self._batch = args[0].shape[0]
        self._tokens, self._attention, self._head_inputs = [], [], []

    def block(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        self._tokens.append(output.flatten(1, -2))  # (B, N, D), and Swin's (B, H, W, C) → (B, H·W, C)

    def attention(self, _module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
        probabilities = args[0]  # the dropout's input: post-softmax, before any training-time dropout
        if not probabilities.requires_grad:
            # Without autograd, lrpq's attn·v quantizes the probabilities in place (QuantMatMul, a_owned).
            probabilities = probabilities.clone()
        self._attention.append(probabilities.reshape(self._batch, -1, *probabilities.shape[-2:]))

    def head(self, _module: nn.Module, args: tuple) -> None:
        self._head_inputs.append(args[0])

    def finish(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        if not isinstance(output, torch.Tensor):
            raise DistillError("the model returned several outputs (distilled training mode?): put it in eval()")
        if len(self._tokens) != self._num_blocks or len(self._head_inputs) != self._num_classifiers:
            raise DistillError("the model's forward skipped some of its blocks or its classifier")
        self._features = DistillFeatures(
            logits=output,
            tokens=self._tokens,
            embedding=torch.stack(self._head_inputs).mean(0).flatten(1),
            attention=self._attention,
        )


@contextmanager
def capture_features(model: nn.Module, *, attention: bool = True) -> Iterator[FeatureCapture]:
    """Record ``DistillFeatures`` from every forward of an unmodified timm ViT/DeiT/Swin (float or lrpq-quantized).

    Nothing is detached, so a student's features carry gradients. With ``attention``, timm's fused SDPA is
    switched off on each attention module for the duration (fused attention never materialises the
    probabilities, which are then read at ``attn_drop``); hooks and ``fused_attn`` flags are restored on exit.
    The logits are the model's own output, unchanged (up to fused vs explicit attention rounding).
    """
    blocks = transformer_blocks(model)
    classifiers = _classifiers(model)
    capture = FeatureCapture(len(blocks), len(classifiers))
    attentions = [block.attn for block in blocks if hasattr(getattr(block, "attn", None), "attn_drop")]
    if not attention or len(attentions) != len(blocks):
        attentions = []
    handles = [model.register_forward_pre_hook(capture.start), model.register_forward_hook(capture.finish)]
    try:
        handles += [block.register_forward_hook(capture.block) for block in blocks]
        handles += [module.attn_drop.register_forward_hook(capture.attention) for module in attentions]
        handles += [classifier.register_forward_pre_hook(capture.head) for classifier in classifiers]
        with explicit_attention(attentions):
            yield capture
    finally:
        for handle in handles:
            handle.remove()


def extract_features(
    model: nn.Module, images: torch.Tensor, *, index: torch.Tensor | None = None, attention: bool = True
) -> DistillFeatures:
    """One forward of ``model`` on ``images`` with its features recorded (run the teacher under no_grad)."""
    with capture_features(model, attention=attention) as capture:
        model(images)
    features = capture.features
    features.index = index
    return features
