"""Teacher → student distillation losses for lrpq's recovery stage (float teacher, fake-quantized student).

A forward of either model gives a ``DistillFeatures`` bundle (``extract_features`` / ``capture_features``);
``build_loss("kd:0.5+mse", FeatureShapes.of(features, num_images))`` gives one module whose ``forward(student,
teacher)`` is the weighted sum and whose parameters (regressors, connectors, embeddings) train with the student.
"""

from lrpq.distill.contrastive import CRDLoss
from lrpq.distill.features import (
    DistillError,
    DistillFeatures,
    FeatureCapture,
    FeatureShapes,
    capture_features,
    extract_features,
)
from lrpq.distill.logit_losses import KDLoss
from lrpq.distill.registry import LOSSES, CombinedLoss, UnknownLossError, build_loss, parse_spec
from lrpq.distill.relation_losses import CCLoss, PKTLoss, RKDLoss, SPLoss
from lrpq.distill.token_losses import ABLoss, BlockMSE, ChannelNormalisedMSE, FitNetLoss, OFDLoss, VIDLoss
from lrpq.distill.token_statistics import ATLoss, FactorTransferLoss, FSPLoss, NSTLoss

__all__ = [
    "LOSSES",
    "ABLoss",
    "ATLoss",
    "BlockMSE",
    "CCLoss",
    "CRDLoss",
    "ChannelNormalisedMSE",
    "CombinedLoss",
    "DistillError",
    "DistillFeatures",
    "FSPLoss",
    "FactorTransferLoss",
    "FeatureCapture",
    "FeatureShapes",
    "FitNetLoss",
    "KDLoss",
    "NSTLoss",
    "OFDLoss",
    "PKTLoss",
    "RKDLoss",
    "SPLoss",
    "UnknownLossError",
    "VIDLoss",
    "build_loss",
    "capture_features",
    "extract_features",
    "parse_spec",
]
