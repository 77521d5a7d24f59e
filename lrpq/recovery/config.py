"""``RecoveryConfig``: everything that determines a recovery, given the quantized model and its images."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from lrpq.distill import parse_spec
from lrpq.errors import LrpqError
from lrpq.recovery.learnable import LEARNABLE

DEFAULT_LOSS = "nmse"  # measured best on ref-B W4A4 over three draws (docs/recovery.md)
# Not the rounding: at its rate no weight changed level on ref-B W4A4 (--mixed, draw 0) or ref-A W4A4, so
# learning it gave the same model, and its weight gradients cost a fifth of the time (docs/recovery.md).
DEFAULT_LEARN = ("scales", "norms", "biases")
# How the weights of a model to be recovered are best ranged (QuantConfig.weight_range_metric; the CLI's
# default with --recover): the input-weighted ranges never lost after recovery (ref-B W4A4 +1.1 fixed and
# +1.6 --mixed, W3A3 --mixed +9.0; ref-A +0.0 and +0.7; three draws each), where unrecovered at 4 bits
# they lean the other way (-0.5, -1.1): what they clip is partly a bias and gain error, which the biases
# and norms recovery learns take back, and the finer grid stays (docs/recovery.md).
RECOVERY_WEIGHT_RANGE = "inputs"


class RecoveryError(LrpqError):
    """A recovery setting that cannot be honoured (no steps, an unknown thing to learn, …)."""


@dataclass(frozen=True)
class RecoveryConfig:
    """The distillation objective, its schedule and what it may change.

    ``loss`` is an ``lrpq.distill.build_loss`` spec (``"kd:0.5+mse"``) on the student's and the float
    teacher's features; ``steps`` optimisation steps of ``batch_size`` augmented calibration images
    (``augment``), Adam with a short warm-up and a cosine decay, one learning rate per group of
    ``learn`` (``lrpq.recovery.learnable``): rounding variables (``lr_rounding``), log activation
    scales (``lr_scales``), LayerNorm/LayerScale/bias floats and the loss's own connectors
    (``lr_floats``, relative to each tensor's root mean square). ``drop`` > 0 trains with QDrop (each
    activation element float with that probability). ``seed`` fixes the batches, views and drops.
    """

    loss: str = DEFAULT_LOSS
    steps: int = 50  # ref-B (ViT-S/14, 32 images): 7-8 minutes on 2 CPU cores without AVX-512
    batch_size: int = 8
    lr_rounding: float = 1e-3
    lr_scales: float = 1e-4
    lr_floats: float = 1e-2
    learn: tuple[str, ...] = DEFAULT_LEARN
    drop: float = 0.0  # QDrop: probability that an activation element stays float in a training step
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        parse_spec(self.loss)  # an unknown loss is the registry's one-line error
        object.__setattr__(self, "learn", tuple(self.learn))
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecoveryError(f"recovery {name}={value!r} must be a positive integer")
        for name in ("lr_rounding", "lr_scales", "lr_floats"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise RecoveryError(f"recovery {name}={value!r} must be a non-negative number")
        if not (isinstance(self.drop, int | float) and 0 <= self.drop < 1):
            raise RecoveryError(f"recovery drop={self.drop!r} must be a probability in [0, 1)")
        unknown = [item for item in self.learn if item not in LEARNABLE]
        if unknown or not self.learn or len(set(self.learn)) != len(self.learn):
            asked = ", ".join(self.learn) or "nothing"
            raise RecoveryError(f"recovery can learn some of {', '.join(LEARNABLE)} (each once), not {asked}")
        object.__setattr__(self, "learn", tuple(sorted(self.learn, key=LEARNABLE.index)))  # one spelling per set

    def to_json_dict(self) -> dict[str, Any]:
        return {**asdict(self), "learn": list(self.learn)}

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> RecoveryConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecoveryError(f"unknown recovery setting {unknown[0]!r}")
        return cls(**{**data, **({"learn": tuple(data["learn"])} if "learn" in data else {})})
