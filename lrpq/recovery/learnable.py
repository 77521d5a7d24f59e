"""What recovery may change in a fake-quant model, made trainable for the duration and written back after.

``learnable(model, learn)`` swaps every quantizer in QUANT mode for a differentiable stand-in
(``lrpq.recovery.ste``) and marks the chosen float parameters trainable; leaving it writes what was
learned back into the quantizers' own buffers and puts them back. Nothing of the stand-ins outlives
the context, so the state dict has exactly the keys it had, and the grids' widths, zero points and
weight scales are never touched:

* ``rounding`` — AdaRound's variable (Nagel et al. 2020): each quantized weight chooses between two
  adjacent levels by ``h(V) ≥ ½``, ``h`` a rectified sigmoid of a free ``V``. The forward always uses
  the chosen level and ``h``'s gradient passes straight through to ``V`` (AdaRound's soft forward
  and annealed regulariser left most levels unsettled after a hundred steps, and hardening them
  then cost more than the training gained: docs/recovery.md), so what trains is exactly what is
  kept: on exit the levels are written into ``WeightQuantizer.rounding_offset`` (levels from the
  nearest one), and ``codes()`` and packed export stay exact;
* ``scales`` — LSQ: the per-tensor scale of every activation quantizer (uniform and log2), learned as
  its logarithm so it stays positive; zero points stay the calibrated integers;
* ``norms`` — LayerNorm affine and LayerScale (float multipliers an integer pipeline applies anyway);
* ``biases`` — every Linear and Conv2d bias (added in the accumulator's float output).

With ``drop = p > 0`` the activation stand-ins also apply QDrop (Wei et al., ICLR 2022) while training:
each element passes its float value instead of its quantized one with probability ``p``, so what is
learned must suit the activations' quantization noise in any mix, not the one mix of the 32 images.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from timm.layers import LayerScale
from torch import nn

from lrpq.api import weighted_layers
from lrpq.primitives import quantize_uniform
from lrpq.quantizers import (
    FakeQuantizer,
    Log2Quantizer,
    LogSqrt2Quantizer,
    QuantMode,
    UniformQuantizer,
    WeightQuantizer,
)
from lrpq.recovery.ste import (
    fake_quant_log2_ste,
    fake_quant_uniform_ste,
    inverse_rectified_sigmoid,
    rectified_sigmoid,
)

LEARNABLE = ("rounding", "scales", "norms", "biases")
# ``h`` starts inside the cell of the level a weight already rounds to (GPTQ's or the nearest), at least
# this many levels from its edge: before any step every weight keeps its level, and a weight changes
# level only after a sustained push (GPTQ's moved weights all sit at an edge otherwise).
_CELL_MARGIN = 0.1


class LearnedRounding(nn.Module):
    """A weight quantizer's stand-in: ``(base + [h(V) ≥ ½] − z) · s``, with ``h``'s gradient passed to ``V``.

    ``base`` and ``base + 1`` are the two levels a weight may take. ``h`` starts at the point of the
    current level's rounding cell nearest the float weight, kept ``_CELL_MARGIN`` inside it (the
    float weight itself where that level is the nearest one and the weight is not near the cell's
    edge), as AdaRound starts from the float weight: a weight that sits near the middle of two
    levels changes level sooner than one near a level.
    """

    # Not QUANT: ``_WeightCache`` then calls this on every forward instead of caching a weight that moves.
    mode = QuantMode.OFF

    def __init__(self, quantizer: WeightQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        self.quantizer = [quantizer]  # a list, so it is not registered as a submodule
        self.weight = [weight]  # the float weight, never changed: the levels are relative to its nearest ones
        levels = 2**quantizer.bits - 1
        with torch.no_grad():
            weight = weight.detach()
            continuous = weight * quantizer.scale.reciprocal() + quantizer.zero_point
            current = quantizer.codes(weight)
            start = torch.clamp(continuous, current - 0.5 + _CELL_MARGIN, current + 0.5 - _CELL_MARGIN)
            start.clamp_(0, levels)
            base = torch.floor(start).clamp_(0, levels - 1)
            self.register_buffer("base", base)
            self.v = nn.Parameter(inverse_rectified_sigmoid(start - base))

    @property
    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def forward(self, weight: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
        quantizer, h = self.quantizer[0], self.h
        up = (self.v >= 0).to(h.dtype) + (h - h.detach())  # [h ≥ ½] forward, dh/dV backward
        return (self.base + up - quantizer.zero_point) * quantizer.scale

    def codes(self) -> torch.Tensor:
        """The level each weight takes: ``base + 1`` where ``h ≥ ½``, i.e. ``V ≥ 0``."""
        return self.base + (self.v.detach() >= 0).to(self.base.dtype)

    @torch.no_grad()
    def write_back(self) -> int:
        """Write the levels into the quantizer's rounding offsets; returns how many weights changed level."""
        quantizer, weight = self.quantizer[0], self.weight[0].detach()
        before = quantizer.codes(weight)
        offset = self.codes() - quantize_uniform(weight, quantizer.scale, quantizer.zero_point, quantizer.bits)
        most = torch.iinfo(quantizer.rounding_offset.dtype).max
        if offset.abs().max() > most:
            raise ValueError(
                f"quantizer '{quantizer.name}': a learned rounding moves a weight by more than {most} levels"
            )
        quantizer.rounding_offset.copy_(offset)
        return int((quantizer.codes(weight) != before).sum())


class LearnedScaleQuantizer(nn.Module):
    """An activation quantizer's stand-in with STE rounding and scale ``s₀ · exp(log_ratio)``, learned or not.

    Learning the logarithm keeps the scale positive and makes a step relative to it, and starting
    from ``exp(0) = 1`` exactly gives the calibrated grid back before any step.
    """

    def __init__(
        self, quantizer: UniformQuantizer | Log2Quantizer | LogSqrt2Quantizer, learn: bool, drop: float = 0.0
    ) -> None:
        super().__init__()
        self.quantizer = [quantizer]
        self.log_ratio = nn.Parameter(quantizer.scale.new_zeros(()), requires_grad=learn)
        self.drop = drop

    mode = QuantMode.QUANT  # stand-ins replace quantizers in QUANT mode only

    def scale(self) -> torch.Tensor:
        return self.quantizer[0].scale * self.log_ratio.exp()

    def forward(self, x: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
        quantizer = self.quantizer[0]
        if isinstance(quantizer, UniformQuantizer):
            return self._dropped(fake_quant_uniform_ste(x, self.scale(), quantizer.zero_point, quantizer.bits), x)
        return self._dropped(fake_quant_log2_ste(x, self.scale(), quantizer.bits), x)

    def _dropped(self, quantized: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
        """QDrop: each element's float value with probability ``drop`` (torch's seeded generator), else its code's."""
        if self.drop == 0:
            return quantized
        return torch.where(torch.rand_like(quantized) < self.drop, exact, quantized)

    def fake_quant(
        self, x: torch.Tensor, out: torch.Tensor | None = None, affine: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The fused call of a folded layer (``QuantLinear._quantized_reparam_input``): fake-quantize ``x·w + c``
        with the inference values bit for bit. Never in place (``out`` is ignored): autograd needs ``x``."""
        if affine is None:
            return self(x)
        quantizer = self.quantizer[0]  # only a uniform grid is given an affine map (``UniformQuantizer.fake_quant``)
        quantized = fake_quant_uniform_ste(x, self.scale(), quantizer.zero_point, quantizer.bits, affine=affine)
        return self._dropped(quantized, torch.addcmul(affine[1], x, affine[0])) if self.drop else quantized

    @torch.no_grad()
    def write_back(self) -> None:
        self.quantizer[0].scale.copy_(self.scale())


@dataclass
class Trainable:
    """The handle ``learnable`` yields: the parameter groups for the optimiser, and on exit what changed."""

    rounding: list[LearnedRounding]
    scales: list[nn.Parameter]
    floats: list[nn.Parameter]
    changed_levels: int = 0  # set on exit: quantized weights whose level differs from their old one

    @property
    def rounding_parameters(self) -> list[nn.Parameter]:
        return [rounding.v for rounding in self.rounding]

    def counts(self) -> dict[str, int]:
        """How many values each group learns."""
        return {
            "rounding": sum(rounding.v.numel() for rounding in self.rounding),
            "scales": sum(p.numel() for p in self.scales),
            "floats": sum(p.numel() for p in self.floats),
        }


def _quantizer_slots(model: nn.Module) -> list[tuple[nn.Module, str, FakeQuantizer]]:
    """(owner, attribute, quantizer) of every quantizer in QUANT mode."""
    return [
        (owner, attribute, child)
        for owner in model.modules()
        for attribute, child in owner.named_children()
        if isinstance(child, FakeQuantizer) and child.mode is QuantMode.QUANT
    ]


def float_parameters(model: nn.Module, learn: tuple[str, ...]) -> list[nn.Parameter]:
    """The LayerNorm/LayerScale (``norms``) and Linear/Conv2d bias (``biases``) parameters, in module order."""
    chosen: list[nn.Parameter] = []
    weighted = set(weighted_layers(model).values())
    for module in model.modules():
        if "norms" in learn and isinstance(module, nn.LayerNorm | LayerScale):
            chosen += [p for p in module.parameters(recurse=False)]
        if "biases" in learn and module in weighted and module.bias is not None:
            chosen.append(module.bias)
    return chosen


@contextmanager
def learnable(model: nn.Module, learn: tuple[str, ...], drop: float = 0.0) -> Iterator[Trainable]:
    """Make ``learn`` (a subset of ``LEARNABLE``) trainable in ``model``; write it back on a normal exit.

    ``drop`` is QDrop's probability that an activation element passes float while inside (0: never).

    Every other parameter is frozen for the duration. On an exception the quantizers are put back
    without writing anything (their buffers are as they were; learned floats stay as they are).
    """
    unknown = set(learn) - set(LEARNABLE)
    if unknown:
        raise ValueError(f"cannot learn {sorted(unknown)}; choose from {', '.join(LEARNABLE)}")
    if not 0 <= drop < 1:
        raise ValueError(f"drop={drop!r}: QDrop's probability must be in [0, 1)")
    weights = {id(layer.weight_quantizer): layer for layer in weighted_layers(model).values()}
    slots = _quantizer_slots(model)
    stand_ins: list[tuple[nn.Module, str, FakeQuantizer, nn.Module]] = []
    for owner, attribute, quantizer in slots:
        layer = weights.get(id(quantizer))
        if layer is not None:
            if "rounding" not in learn:
                continue  # a frozen weight grid needs no gradient of its own; the input's passes through it
            stand_in: nn.Module = LearnedRounding(quantizer, layer.weight)
        else:
            stand_in = LearnedScaleQuantizer(quantizer, learn="scales" in learn, drop=drop)
        stand_ins.append((owner, attribute, quantizer, stand_in))
    floats = float_parameters(model, learn)
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in floats:
        p.requires_grad_(True)
    for owner, attribute, _, stand_in in stand_ins:
        setattr(owner, attribute, stand_in)
    trainable = Trainable(
        rounding=[s for *_, s in stand_ins if isinstance(s, LearnedRounding)],
        scales=[
            s.log_ratio for *_, s in stand_ins if isinstance(s, LearnedScaleQuantizer) and s.log_ratio.requires_grad
        ],
        floats=floats,
    )
    try:
        yield trainable
    except BaseException:
        _restore(stand_ins, requires_grad)
        raise
    for *_, stand_in in stand_ins:
        if isinstance(stand_in, LearnedRounding):
            trainable.changed_levels += stand_in.write_back()
        else:
            stand_in.write_back()
    _restore(stand_ins, requires_grad)


def _restore(
    stand_ins: list[tuple[nn.Module, str, FakeQuantizer, nn.Module]], requires_grad: dict[nn.Parameter, bool]
) -> None:
    for owner, attribute, quantizer, _ in stand_ins:
        setattr(owner, attribute, quantizer)
    for p, flag in requires_grad.items():
        p.requires_grad_(flag)
