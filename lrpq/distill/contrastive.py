"""CRD: contrastive representation distillation with a memory of every calibration image's embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrpq.distill.connectors import identity_linear
from lrpq.distill.features import DistillError, DistillFeatures, FeatureShapes

REPDISTILLER_NCE_K = 16384


class ContrastiveEmbedding(nn.Module):
    """CRD's head: a Linear to the contrast space, then L2 normalisation (identity Linear when widths match)."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.linear = identity_linear(width) if dim == width else nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class CRDLoss(nn.Module):
    """Contrastive representation distillation (Tian et al. ICLR 2020), NCE against a memory of embeddings.

    v_s = g_s(student embedding), v_t = g_t(teacher embedding), g = ``ContrastiveEmbedding`` (learnable, both).
    Two memories hold one unit vector per calibration image: M_s (student side) and M_t (teacher side). For a
    sample i with K negatives j drawn uniformly from the *other* images,

    h(v, M, j) = exp(v · M_j / τ) / Z,
    ℓ(v, M) = −log[h_i / (h_i + K/n)] − Σ_j log[(K/n) / (h_j + K/n)],
    L = mean_i [ℓ(v_s, M_t) + ℓ(v_t, M_s)],

    Z = n · mean(exp(v · M_· / τ)) fixed on the first call (RepDistiller's constant), n = number of images.
    After each call M[i] ← normalise(m · M[i] + (1 − m) · v) with momentum m.

    Defaults: τ = 0.07, m = 0.5 (RepDistiller's ``nce_t``, ``nce_m``); K = min(16384, n − 1): with ~32
    calibration images K must be < n, and its default takes every other image. The contrast space has the
    embedding's width with identity-initialised heads (RepDistiller: 128-d, random init). Adaptations for a
    calibration set this small: negatives exclude the positive (a uniform draw over n = 32 would hit it
    1 in 32 times), and a memory row is set to the embedding itself the first time its image is seen instead
    of starting from noise that many epochs would wash out. Negatives come from the loss's own seeded
    generator, so two runs with the same seed draw the same ones. Needs ``index`` in the features.
    """

    def __init__(
        self,
        shapes: FeatureShapes,
        *,
        dim: int | None = None,
        negatives: int | None = None,
        temperature: float = 0.07,
        momentum: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if shapes.num_images is None or shapes.num_images < 2:
            raise DistillError("CRD needs the number of calibration images (at least 2) for its memory")
        self.num_images = shapes.num_images
        self.negatives = min(REPDISTILLER_NCE_K, self.num_images - 1) if negatives is None else negatives
        if not 1 <= self.negatives < self.num_images:
            raise DistillError(
                f"CRD draws K negatives among the other images: K must be in 1..{self.num_images - 1}, "
                f"got {self.negatives}"
            )
        self.temperature = temperature
        self.momentum = momentum
        dim = shapes.embed_dim if dim is None else dim
        self.embed_student = ContrastiveEmbedding(shapes.embed_dim, dim)
        self.embed_teacher = ContrastiveEmbedding(shapes.embed_dim, dim)
        self.generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(2, self.num_images, dim, generator=self.generator)
        self.register_buffer("memory_student", F.normalize(noise[0], dim=1))
        self.register_buffer("memory_teacher", F.normalize(noise[1], dim=1))
        self.register_buffer("seen", torch.zeros(self.num_images, dtype=torch.bool))
        self.register_buffer("normalisers", torch.full((2,), -1.0))  # Z for ℓ(v_s, M_t), ℓ(v_t, M_s)

    def _draw_candidates(self, index: torch.Tensor) -> torch.Tensor:
        """(B, 1 + K) memory rows: the positive first, then K distinct other images per sample."""
        ranks = torch.rand(len(index), self.num_images - 1, generator=self.generator).argsort(dim=1)
        others = ranks[:, : self.negatives].to(index.device)
        others = others + (others >= index.unsqueeze(1)).long()  # skip the positive's own row
        return torch.cat([index.unsqueeze(1), others], dim=1)

    def _nce(self, anchor: torch.Tensor, memory: torch.Tensor, candidates: torch.Tensor, side: int) -> torch.Tensor:
        scores = torch.exp(torch.einsum("bkd,bd->bk", memory[candidates], anchor) / self.temperature)
        if self.normalisers[side] < 0:
            self.normalisers[side] = scores.detach().mean() * self.num_images
        h = scores / self.normalisers[side].clone()
        noise = self.negatives / self.num_images
        positive = torch.log(h[:, 0] / (h[:, 0] + noise))
        negative = torch.log(noise / (h[:, 1:] + noise)).sum(dim=1)
        return -(positive + negative).mean()

    @torch.no_grad()
    def _remember(self, memory: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> None:
        memory[index] = F.normalize(self.momentum * memory[index] + (1 - self.momentum) * value, dim=1)

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        index = student.index if student.index is not None else teacher.index
        if index is None:
            raise DistillError("CRD needs each sample's calibration index: set DistillFeatures.index")
        v_student = self.embed_student(student.embedding)
        v_teacher = self.embed_teacher(teacher.embedding.detach())
        with torch.no_grad():
            first = ~self.seen[index]
            new = index[first]
            self.memory_student[new] = v_student.detach()[first]
            self.memory_teacher[new] = v_teacher.detach()[first]
            self.seen[new] = True
        candidates = self._draw_candidates(index)
        loss = self._nce(v_student, self.memory_teacher, candidates, 0) + self._nce(
            v_teacher, self.memory_student, candidates, 1
        )
        self._remember(self.memory_student, index, v_student.detach())
        self._remember(self.memory_teacher, index, v_teacher.detach())
        return loss
