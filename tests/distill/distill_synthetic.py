"""Random feature bundles for the loss tests: no model needed, every field filled."""

from __future__ import annotations

import torch

from lrpq.distill import DistillFeatures

BATCH, CLASSES, TOKENS, WIDTH, BLOCKS = 4, 7, 5, 6, 3


def teacher_features(seed: int = 0) -> DistillFeatures:
    """Block outputs with |t| ≥ 1 everywhere, so even AB's margin hinge is zero when the student copies them."""
    g = torch.Generator().manual_seed(seed)

    def away_from_zero(*shape: int) -> torch.Tensor:
        return torch.sign(torch.randn(*shape, generator=g)) * (1 + torch.rand(*shape, generator=g))

    return DistillFeatures(
        logits=torch.randn(BATCH, CLASSES, generator=g),
        tokens=[away_from_zero(BATCH, TOKENS, WIDTH) for _ in range(BLOCKS)],
        embedding=torch.randn(BATCH, WIDTH, generator=g),
        index=torch.arange(BATCH),
    )


def copy_of(features: DistillFeatures, noise: float = 0.0, seed: int = 1) -> DistillFeatures:
    """A leaf copy that requires grad, optionally perturbed by ``noise`` · N(0, 1)."""
    g = torch.Generator().manual_seed(seed)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return (t + noise * torch.randn(t.shape, generator=g)).requires_grad_(True)

    return DistillFeatures(
        logits=leaf(features.logits),
        tokens=[leaf(t) for t in features.tokens],
        embedding=leaf(features.embedding),
        index=features.index,
    )


def leaves(features: DistillFeatures) -> list[torch.Tensor]:
    return [features.logits, *features.tokens, features.embedding]


def tokens_only(*blocks: list[list[float]] | torch.Tensor) -> DistillFeatures:
    """A bundle whose blocks are the given (B, N, D) tensors (nested lists allowed); other fields are dummies."""
    tokens = [torch.as_tensor(block, dtype=torch.float32) for block in blocks]
    batch = tokens[0].shape[0]
    return DistillFeatures(logits=torch.zeros(batch, 2), tokens=tokens, embedding=torch.zeros(batch, 2))


def embeddings_only(embedding: list[list[float]]) -> DistillFeatures:
    e = torch.tensor(embedding, dtype=torch.float32)
    return DistillFeatures(logits=torch.zeros(len(e), 2), tokens=[torch.zeros(len(e), 1, 1)], embedding=e)
