"""Losses that transfer how samples of the batch relate to each other rather than the samples themselves."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lrpq.distill.features import DistillFeatures, resolve_blocks


def batch_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """SP's (B, B) Gram matrix of the flattened block outputs, each row L2-normalised."""
    flat = tokens.flatten(1)
    return F.normalize(flat @ flat.T, dim=1)


class SPLoss(nn.Module):
    """Similarity-preserving KD (Tung & Mori ICCV 2019): L = Σ_l ‖G(t_l) − G(s_l)‖²_F / B².

    G is ``batch_similarity`` of the (B, N·D) flattened block output; the last block by default (RepDistiller:
    the last stage, ``feat[-2]``).
    """

    def __init__(self, blocks: Sequence[int] | None = (-1,)) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        teacher = teacher.detach()
        total = 0.0
        for block in resolve_blocks(self.blocks, len(student.tokens)):
            difference = batch_similarity(teacher.tokens[block]) - batch_similarity(student.tokens[block])
            total = total + difference.pow(2).sum() / difference.shape[0] ** 2
        return total


def pairwise_distances(embedding: torch.Tensor) -> torch.Tensor:
    """(B, B) Euclidean distances, 0 on the diagonal (the clamp keeps sqrt's gradient finite there)."""
    squared = (embedding.unsqueeze(0) - embedding.unsqueeze(1)).pow(2).sum(-1)
    off_diagonal = 1.0 - torch.eye(len(embedding), dtype=embedding.dtype, device=embedding.device)
    return squared.clamp(min=1e-12).sqrt() * off_diagonal


def triplet_angles(embedding: torch.Tensor) -> torch.Tensor:
    """(B, B, B) cosines ⟨u(e_j − e_i), u(e_k − e_i)⟩ of the angle at anchor i, u(·) the unit vector (0 for 0)."""
    directions = F.normalize(embedding.unsqueeze(0) - embedding.unsqueeze(1), dim=-1)  # [i, j] = u(e_j − e_i)
    return directions @ directions.transpose(1, 2)


class RKDLoss(nn.Module):
    """Relational KD (Park et al. CVPR 2019) on the pre-logits embeddings, distance and angle terms:

    L = w_d · smoothL1(d(s) / μ(s), d(t) / μ(t)) + w_a · smoothL1(∠(s), ∠(t)),

    d = ``pairwise_distances``, μ = mean of d over the pairs i ≠ j, ∠ = ``triplet_angles``; smooth L1 with
    β = 1, averaged over entries. w_d = 25, w_a = 50 are RepDistiller's (and the paper's).
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    @staticmethod
    def _normalised_distances(embedding: torch.Tensor) -> torch.Tensor:
        distances = pairwise_distances(embedding)
        pairs = len(embedding) * (len(embedding) - 1)
        return distances / (distances.sum() / pairs)

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        s, t = student.embedding, teacher.embedding.detach()
        distance = F.smooth_l1_loss(self._normalised_distances(s), self._normalised_distances(t))
        angle = F.smooth_l1_loss(triplet_angles(s), triplet_angles(t))
        return self.distance_weight * distance + self.angle_weight * angle


def cosine_conditionals(embedding: torch.Tensor, eps: float) -> torch.Tensor:
    """PKT's p(j | i): cosine similarity mapped to [0, 1] by (c + 1) / 2, each row divided by its sum."""
    unit = embedding / (embedding.norm(dim=1, keepdim=True) + eps)
    kernel = (unit @ unit.T + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


class PKTLoss(nn.Module):
    """Probabilistic knowledge transfer (Passalis & Tefas ECCV 2018) on the pre-logits embeddings:

    L = mean_{i,j} q_{j|i} · log((q_{j|i} + ε) / (p_{j|i} + ε)),  q from the teacher, p from the student,
    both ``cosine_conditionals`` (cosine kernel); ε = 1e-7, as in the authors' code used by RepDistiller.
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        p = cosine_conditionals(student.embedding, self.eps)
        q = cosine_conditionals(teacher.embedding.detach(), self.eps)
        return (q * torch.log((q + self.eps) / (p + self.eps))).mean()


def taylor_rbf_correlation(embedding: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """CC's (B, B) correlation: the Gaussian RBF exp(−γ‖x − y‖²) of L2-normalised x, y, expanded to ``order``:

    k(x, y) = exp(−2γ) · Σ_{p=0..P} (2γ)^p / p! · (x · y)^p   (exact as P → ∞, since ‖x − y‖² = 2 − 2 x · y).
    """
    unit = F.normalize(embedding, dim=1)
    cosine = unit @ unit.T
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * cosine.pow(p) for p in range(order + 1))


class CCLoss(nn.Module):
    """Correlation congruence (Peng et al. ICCV 2019) on the pre-logits embeddings:

    L = ‖C(s) − C(t)‖²_F / B²,  C = ``taylor_rbf_correlation`` with γ = 0.4 and P = 2 (the paper's).

    RepDistiller ships a different, simplified CC (mean over consecutive samples of Σ_d |Δ_i,d| |Δ_i+1,d|)
    behind learnable linear embeddings of both networks; this follows the paper. The embeddings are used as
    they are: widths match, and a learnable embedding on the teacher side could lower the loss without
    moving the student.
    """

    def __init__(self, gamma: float = 0.4, order: int = 2) -> None:
        super().__init__()
        self.gamma = gamma
        self.order = order

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        c_student = taylor_rbf_correlation(student.embedding, self.gamma, self.order)
        c_teacher = taylor_rbf_correlation(teacher.embedding.detach(), self.gamma, self.order)
        return F.mse_loss(c_student, c_teacher)
