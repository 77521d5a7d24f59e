"""Optional recovery after calibration: the float model teaches the fake-quant one on the calibration images.

``recover(student, teacher, images, RecoveryConfig(loss="nmse"))`` learns LSQ activation scales and the
LayerNorm/bias floats (and, asked with ``learn``, AdaRound weight rounding) end to end against an
``lrpq.distill`` loss, and leaves a fake-quant model with the same bit plan whose learned values all
live in its state dict. Quantize a model meant for recovery with
``QuantConfig(weight_range_metric=RECOVERY_WEIGHT_RANGE)``: after recovery it was never worse (docs/recovery.md).
"""

from lrpq.recovery.config import DEFAULT_LEARN, DEFAULT_LOSS, RECOVERY_WEIGHT_RANGE, RecoveryConfig, RecoveryError
from lrpq.recovery.learnable import LEARNABLE, Trainable, learnable
from lrpq.recovery.recover import RecoveryReport, recover

__all__ = [
    "DEFAULT_LEARN",
    "DEFAULT_LOSS",
    "LEARNABLE",
    "RECOVERY_WEIGHT_RANGE",
    "RecoveryConfig",
    "RecoveryError",
    "RecoveryReport",
    "Trainable",
    "learnable",
    "recover",
]
