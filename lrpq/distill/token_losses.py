"""Losses that compare block outputs token by token and channel by channel.

Tokens are the spatial axis of a CNN feature map. ViT blocks have no ReLU after them: where a CNN loss reads
the "pre-ReLU" feature (AB, OFD), it is the sum of residual branch and shortcut at the end of a ResNet block,
and the ViT counterpart of that sum is the block output (the residual stream), which is what is used here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lrpq.distill.connectors import identity_linear
from lrpq.distill.features import DistillFeatures, FeatureShapes, resolve_blocks


class BlockMSE(nn.Module):
    """Blockwise output reconstruction (BRECQ-style, unweighted), the reference objective:

    L = Σ_l mean_{b,n,d} (s_l − t_l)², over every block l (or ``blocks``).
    """

    def __init__(self, blocks: Sequence[int] | None = None) -> None:
        super().__init__()
        self.blocks = blocks

    def block_pairs(
        self, student: DistillFeatures, teacher: DistillFeatures
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(student, detached teacher) output of every chosen block."""
        chosen = resolve_blocks(self.blocks, len(student.tokens))
        return [(student.tokens[block], teacher.tokens[block].detach()) for block in chosen]

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        return sum(F.mse_loss(s, t) for s, t in self.block_pairs(student, teacher))


class ChannelNormalisedMSE(BlockMSE):
    """Blockwise output reconstruction with every channel weighted alike, the blocks averaged:

    L = (1/|blocks|) Σ_l mean_{b,n,d} (s_l − t_l)² / P_{l,d},   P_{l,d} = mean_{b,n} t_l[b, n, d]²,

    the teacher's power of channel d in the batch (floored at 10⁻⁶ of the block's mean power). A ViT's
    residual stream grows with depth and a few channels carry most of it (ref-B's last block: mean
    square 5.5 against ≤ 0.2 in the eleven before, single values to 31), so plain ``mse`` spends its
    gradient on those channels of the last block: on ref-B W4A4 (draw 0, 50 steps) it lowered the last
    block's relative error from 0.14 to 0.07 while raising every earlier block's, where this lowered all
    of them (docs/recovery.md).
    """

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        pairs = self.block_pairs(student, teacher)
        return sum(channel_normalised_mse(output, target) for output, target in pairs) / len(pairs)


def channel_normalised_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One block's term of ``ChannelNormalisedMSE``: mean_{b,n,d} (s − t)² / P_d on (B, N, D) tokens."""
    power = target.square().mean(dim=(0, 1))
    power = power.clamp(min=1e-6 * power.mean().item())
    return ((output - target).square() / power).mean()


class FitNetLoss(nn.Module):
    """FitNets hint (Romero et al. 2015): L = mean_{b,n,d} (W s_h + c − t_h)² at one hint block h.

    RepDistiller hints at its middle stage (``--hint_layer 2``); the default here is block ``num_blocks // 2``.
    Its regressor is conv + BN + ReLU because it maps between CNN widths; widths are equal here and ViT tokens
    are signed, so the regressor is a plain Linear (W, c) initialised to the identity.
    """

    def __init__(self, shapes: FeatureShapes, block: int | None = None) -> None:
        super().__init__()
        (self.block,) = resolve_blocks([shapes.num_blocks // 2 if block is None else block], shapes.num_blocks)
        self.regressor = identity_linear(shapes.tokens[self.block][1])

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        target = teacher.tokens[self.block].detach()
        return F.mse_loss(self.regressor(student.tokens[self.block]), target)


def _softplus_inverse(value: float) -> float:
    return math.log(math.expm1(value))


class VIDLoss(nn.Module):
    """Variational information distillation (Ahn et al. 2019), a Gaussian likelihood of the teacher per block:

    L = Σ_l mean_{b,n,d} ½ [(μ_l(s_l) − t_l)² / σ²_l,d + log σ²_l,d],  σ²_l,d = softplus(ρ_l,d) + ε.

    Learnable: a regressor μ_l and a per-channel raw variance ρ_l for each block; σ² starts at 5 and ε = 1e-5
    (RepDistiller's ``init_pred_var``, ``eps``). RepDistiller's μ is a three-layer 1×1-conv MLP sized for
    different widths; here μ is a Linear initialised to the identity, so step 0 is the plain scaled MSE
    (plus the constant ½ log σ²). Not zero at s = t: the minimum over the student is ½ mean log σ².
    """

    def __init__(
        self,
        shapes: FeatureShapes,
        blocks: Sequence[int] | None = None,
        init_variance: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.blocks = resolve_blocks(blocks, shapes.num_blocks)
        self.eps = eps
        widths = [shapes.tokens[block][1] for block in self.blocks]
        self.regressors = nn.ModuleList(identity_linear(width) for width in widths)
        self.raw_variances = nn.ParameterList(
            nn.Parameter(torch.full((width,), _softplus_inverse(init_variance - eps))) for width in widths
        )

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        teacher = teacher.detach()
        total = 0.0
        for block, regressor, raw in zip(self.blocks, self.regressors, self.raw_variances, strict=True):
            variance = F.softplus(raw) + self.eps
            mean = regressor(student.tokens[block])
            total = total + (0.5 * ((mean - teacher.tokens[block]) ** 2 / variance + variance.log())).mean()
        return total


class ABLoss(nn.Module):
    """Activation-boundary transfer (Heo et al. AAAI 2019), a hinge on the teacher's sign pattern per block:

    ℓ_l = Σ_{b,n,d} [(s + m)² · 1(s > −m, t ≤ 0) + (s − m)² · 1(s ≤ m, t > 0)],
    L = (3 / 1000) · Σ_l 2^(i − k + 1) ℓ_l / B, with i the position of l among the k chosen blocks.

    m = 1 and the weights, the division by B and the 3/1000 are RepDistiller's. s, t: block outputs (see the
    module docstring). RepDistiller's connector is the identity when widths match, so nothing is learnable.
    Zero exactly when every student value has the teacher's sign with magnitude ≥ m; not zero at s = t
    where |t| < m.
    """

    def __init__(self, blocks: Sequence[int] | None = None, margin: float = 1.0, scale: float = 3e-3) -> None:
        super().__init__()
        self.blocks = blocks
        self.margin = margin
        self.scale = scale

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        teacher = teacher.detach()
        chosen = resolve_blocks(self.blocks, len(student.tokens))
        m = self.margin
        total = 0.0
        for i, block in enumerate(chosen):
            s, t = student.tokens[block], teacher.tokens[block]
            off = (s + m) ** 2 * ((s > -m) & (t <= 0))
            on = (s - m) ** 2 * ((s <= m) & (t > 0))
            total = total + 2.0 ** (i - len(chosen) + 1) * (off + on).sum()
        return total * self.scale / student.tokens[0].shape[0]


def channel_margin(teacher: torch.Tensor) -> torch.Tensor:
    """Per channel, the mean of the teacher's negative values over batch and tokens (0 if it has none)."""
    negative = teacher < 0
    count = negative.sum(dim=(0, 1)).clamp(min=1)
    return (teacher * negative).sum(dim=(0, 1)) / count


class OFDLoss(nn.Module):
    """Overhaul of feature distillation (Heo et al. ICCV 2019), margin-based partial L2 per block:

    τ = max(t, m_d),  ℓ_l = Σ_{b,n,d} (r_l(s) − τ)² · 1(r_l(s) > τ or τ > 0),
    L = α · Σ_l ℓ_l / 2^(k − i − 1) / B, with i the position of l among the k chosen blocks.

    m_d = E[t_d | t_d < 0], the channel's negative mean: the paper derives it from the BN before the ReLU
    assuming a Gaussian; ViT blocks have no such BN, so it is measured on the teacher batch instead.
    s, t are block outputs (see the module docstring); negative teacher values below the margin are only
    matched as "at most m". The connector r_l replaces the paper's 1×1 conv + BN with a Linear initialised
    to the identity (a BN would renormalise the student at step 0). α = 1e-4 and the 2^ weights are the
    ImageNet settings of the authors' code (``/ batch_size / 10000``).
    """

    def __init__(self, shapes: FeatureShapes, blocks: Sequence[int] | None = None, scale: float = 1e-4) -> None:
        super().__init__()
        self.blocks = resolve_blocks(blocks, shapes.num_blocks)
        self.scale = scale
        self.connectors = nn.ModuleList(identity_linear(shapes.tokens[block][1]) for block in self.blocks)

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        teacher = teacher.detach()
        k = len(self.blocks)
        total = 0.0
        for i, (block, connector) in enumerate(zip(self.blocks, self.connectors, strict=True)):
            s, t = connector(student.tokens[block]), teacher.tokens[block]
            target = torch.maximum(t, channel_margin(t))
            selected = (s > target) | (target > 0)
            total = total + ((s - target) ** 2 * selected).sum() / 2.0 ** (k - i - 1)
        return total * self.scale / student.tokens[0].shape[0]
