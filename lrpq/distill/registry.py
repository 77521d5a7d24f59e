"""CLI names of the distillation losses and the parser of ``--recover`` specs such as ``"kd:0.5+mse"``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lrpq.distill.contrastive import CRDLoss
from lrpq.distill.features import DistillError, DistillFeatures, FeatureShapes
from lrpq.distill.logit_losses import KDLoss
from lrpq.distill.relation_losses import CCLoss, PKTLoss, RKDLoss, SPLoss
from lrpq.distill.token_losses import ABLoss, BlockMSE, ChannelNormalisedMSE, FitNetLoss, OFDLoss, VIDLoss
from lrpq.distill.token_statistics import ATLoss, FactorTransferLoss, FSPLoss, NSTLoss


class UnknownLossError(DistillError):
    """A ``--recover`` spec that names no known loss or has a malformed weight."""


LossFactory = Callable[[FeatureShapes], nn.Module]

LOSSES: dict[str, LossFactory] = {
    "kd": lambda shapes: KDLoss(),
    "fitnet": FitNetLoss,
    "at": lambda shapes: ATLoss(),
    "sp": lambda shapes: SPLoss(),
    "cc": lambda shapes: CCLoss(),
    "vid": VIDLoss,
    "rkd": lambda shapes: RKDLoss(),
    "pkt": lambda shapes: PKTLoss(),
    "ab": lambda shapes: ABLoss(),
    "ft": FactorTransferLoss,
    "fsp": lambda shapes: FSPLoss(),
    "nst": lambda shapes: NSTLoss(),
    "crd": CRDLoss,
    "ofd": OFDLoss,
    "mse": lambda shapes: BlockMSE(),
    "nmse": lambda shapes: ChannelNormalisedMSE(),
}


class CombinedLoss(nn.Module):
    """Σ_k w_k · L_k over the terms of a spec; the terms' learnable parts are this module's parameters."""

    def __init__(self, terms: dict[str, nn.Module], weights: dict[str, float]) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)

    def components(self, student: DistillFeatures, teacher: DistillFeatures) -> dict[str, torch.Tensor]:
        """Each weighted term by name, for logging; ``forward`` is their sum."""
        return {name: self.weights[name] * term(student, teacher) for name, term in self.terms.items()}

    def forward(self, student: DistillFeatures, teacher: DistillFeatures) -> torch.Tensor:
        return sum(self.components(student, teacher).values())


def parse_spec(spec: str) -> dict[str, float]:
    """``"kd:0.5+mse"`` → {"kd": 0.5, "mse": 1.0}; names are case-insensitive, weights positive and finite."""
    accepted = ", ".join(LOSSES)
    weights: dict[str, float] = {}
    for term in spec.split("+"):
        name, separator, weight_text = term.strip().partition(":")
        name = name.strip().lower()
        if name not in LOSSES:
            raise UnknownLossError(f"unknown distillation loss {name!r} in {spec!r}; accepted: {accepted}")
        if name in weights:
            raise UnknownLossError(f"distillation loss {name!r} appears twice in {spec!r}")
        try:
            weight = float(weight_text) if separator else 1.0
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise UnknownLossError(f"weight of {name!r} in {spec!r} must be a positive number, got {weight_text!r}")
        weights[name] = weight
    return weights


def build_loss(spec: str, shapes: FeatureShapes) -> CombinedLoss:
    """The weighted sum named by ``spec`` (``name[:weight]`` joined by ``+``), each term sized by ``shapes``."""
    weights = parse_spec(spec)
    return CombinedLoss({name: LOSSES[name](shapes) for name in weights}, weights)
