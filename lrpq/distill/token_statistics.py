"""Losses that compare a statistic of the block outputs rather than the outputs themselves.

Each CNN statistic over spatial positions becomes the same statistic over tokens: AT's spatial attention
map is a map over tokens, FSP's and NST's averages over positions are averages over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from lrpq.distill.features import DistillError, DistillFeatures, FeatureShapes, resolve_blocks


def token_attention(tokens: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT's map over tokens: mean over channels of |f|^p per token, L2-normalised over tokens → (B, N)."""
    return F.normalize(tokens.abs().pow(p).mean(dim=-1), dim=1)


class ATLoss(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis 2017): L = Σ_l mean_{b,n} (a(s_l) − a(t_l))².

    a(f)_n = q_n / ‖q‖₂ with q_n = mean_d f_{n,d}^p, p = 2 (RepDistiller's default), every block by default
    (RepDistiller: every stage output).
    """

    def __init__(self, blocks: Sequence[int] | None = None, p: float = 2.0) -> None:
        super().__init__()
        self.blocks = blocks
        self.p = p

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        teacher = teacher.detach()
        chosen = resolve_blocks(self.blocks, len(student.tokens))
        return sum(
            F.mse_loss(token_attention(student.tokens[block], self.p), token_attention(teacher.tokens[block], self.p))
            for block in chosen
        )


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Flow of solution procedure: G_{i,j} = (1/N) Σ_n bottom_{n,i} · top_{n,j} → (B, D_bottom, D_top)."""
    return bottom.transpose(1, 2) @ top / bottom.shape[1]


class FSPLoss(nn.Module):
    """FSP (Yim et al. CVPR 2017): L = Σ_{(l, l')} mean_{b,i,j} (G(s_l, s_l') − G(t_l, t_l'))².

    (l, l') runs over consecutive chosen blocks (every block by default) with the same token count: a Swin
    patch merging changes the token grid, and pooling the finer grid (as RepDistiller does for CNN stages)
    would need the grid layout the bundle no longer has, so those pairs are skipped. RepDistiller uses FSP
    only to pre-train the student (its main-stage loss is 0); here it is an ordinary term.
    """

    def __init__(self, blocks: Sequence[int] | None = None) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        teacher = teacher.detach()
        chosen = resolve_blocks(self.blocks, len(student.tokens))
        pairs = [(a, b) for a, b in pairwise(chosen) if student.tokens[a].shape[1] == student.tokens[b].shape[1]]
        if not pairs:
            raise DistillError("FSP needs two consecutive chosen blocks with the same number of tokens")
        return sum(
            F.mse_loss(
                fsp_matrix(student.tokens[a], student.tokens[b]), fsp_matrix(teacher.tokens[a], teacher.tokens[b])
            )
            for a, b in pairs
        )


def _mean_polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_{b,i,j} (x_{b,i} · y_{b,j})², the degree-2 polynomial kernel between all channel pairs."""
    return (x @ y.transpose(1, 2)).pow(2).mean()


class NSTLoss(nn.Module):
    """Neuron selectivity transfer (Huang & Wang 2017), squared MMD between the channels' token patterns:

    L = Σ_l [k̄(t̂, t̂) + k̄(ŝ, ŝ) − 2 k̄(ŝ, t̂)],  k̄(x, y) = mean_{b,i,j} (x_{b,i} · y_{b,j})².

    Each channel d is one sample, described by its activations over the N tokens (a CNN neuron's over H·W
    positions), L2-normalised over tokens: f̂_{b,d} = f_{b,·,d} / ‖f_{b,·,d}‖. Polynomial kernel of degree 2
    with c = 0 (the paper's and RepDistiller's choice); every block by default.
    """

    def __init__(self, blocks: Sequence[int] | None = None) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        teacher = teacher.detach()
        total = 0.0
        for block in resolve_blocks(self.blocks, len(student.tokens)):
            s = F.normalize(student.tokens[block].transpose(1, 2), dim=-1)
            t = F.normalize(teacher.tokens[block].transpose(1, 2), dim=-1)
            total = total + (
                _mean_polynomial_kernel(t, t) + _mean_polynomial_kernel(s, s) - 2 * _mean_polynomial_kernel(s, t)
            )
        return total


class FactorTransferLoss(nn.Module):
    """Factor transfer (Kim et al. NeurIPS 2018) at one block (the last by default, RepDistiller's ``feat[-2]``):

    L = mean_{b,k} |F̂_s − F̂_t|,  F_t = t Pᵀ (paraphraser), F_s = s Wᵀ (translator), F̂ = F / ‖F‖₂ per sample,
    with F flattened over tokens and the K = ⌊rate · D⌋ factors (rate 0.5, the paper's and RepDistiller's; p = 1).

    Simplification: the original paraphraser is a conv auto-encoder pre-trained on the teacher's features
    with a reconstruction MSE and then frozen, and the translator a conv encoder. Both become linear maps on
    each token. The best linear auto-encoder (no bias) under MSE is the projection on the top-K right singular
    vectors of the teacher token matrix, so instead of a pre-training stage the paraphraser P is fitted in
    closed form on the first teacher batch the loss sees, and frozen. The translator W is learnable and starts
    equal to P, so at step 0 the loss is zero when the student matches the teacher.
    """

    def __init__(self, shapes: FeatureShapes, block: int = -1, rate: float = 0.5) -> None:
        super().__init__()
        (self.block,) = resolve_blocks([block], shapes.num_blocks)
        width = shapes.tokens[self.block][1]
        self.factors = max(1, int(rate * width))
        self.register_buffer("paraphraser", torch.zeros(self.factors, width))
        self.register_buffer("fitted", torch.tensor(False))
        self.translator = nn.Linear(width, self.factors, bias=False)

    @torch.no_grad()
    def _fit(self, teacher_tokens: torch.Tensor) -> None:
        _, _, right = torch.linalg.svd(teacher_tokens.flatten(0, 1).double(), full_matrices=False)
        self.paraphraser.copy_(right[: self.factors])
        self.translator.weight.copy_(right[: self.factors])
        self.fitted.fill_(True)

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        target = teacher.tokens[self.block].detach()
        if not self.fitted:
            self._fit(target)
        factor_teacher = F.normalize((target @ self.paraphraser.T).flatten(1), dim=1)
        factor_student = F.normalize(self.translator(student.tokens[self.block]).flatten(1), dim=1)
        return (factor_student - factor_teacher).abs().mean()
