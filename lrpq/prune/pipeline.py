"""One call from a float timm model to a pruned one: score → select → cut → refit → (sparsify).

``prune(model, PruneConfig(heads=0.25, mlp=0.3, criterion="lrp"), calib, input_size=(3, 224, 224))``
scores every head and hidden channel on the calibration images, keeps the best per block (or
globally), cuts the model in place, refits proj and fc2 on the same images so each block's output
is reconstructed, and optionally zeroes the smallest remaining weights. ``scores`` computed once can
be passed back in, so other fractions, rankings or recovery settings do not recompute them.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lrpq.errors import LrpqError
from lrpq.prune.cost import ModelCost, model_cost
from lrpq.prune.criteria import CRITERIA, DATA_CRITERIA, UnitScores, score_units
from lrpq.prune.lrp_scores import DEFAULT_LRP_SCORE, LRP_SCORES
from lrpq.prune.recovery import Refit, refit_consumers
from lrpq.prune.selection import RANKINGS, removed_share, select_structure
from lrpq.prune.structure import PrunedStructure, apply_structure, unpruned
from lrpq.prune.unstructured import SCOPES, Sparsity, magnitude_prune


class PruneError(LrpqError):
    """A pruning request that cannot be carried out as asked."""


def _check_fraction(value: float, what: str) -> None:
    if not 0.0 <= value < 1.0:
        raise PruneError(f"{what} {value} must be in [0, 1): every block keeps at least one unit")


@dataclass(frozen=True)
class PruneConfig:
    """What to remove and how to choose it; JSON-friendly like ``QuantConfig``."""

    heads: float = 0.0  # fraction of each block's attention heads to remove
    mlp: float = 0.0  # fraction of each block's MLP hidden channels to remove
    criterion: str = "lrp"
    ranking: str = "per-block"
    hidden_multiple: int = 1  # round each block's kept hidden channels up to a multiple of this
    recovery: bool = True
    lrp_score: str = DEFAULT_LRP_SCORE
    unstructured: float = 0.0  # sparsity of magnitude pruning after the structured step
    unstructured_scope: str = "global"
    seed: int = 0  # the random criterion's

    def __post_init__(self) -> None:
        _check_fraction(self.heads, "--heads")
        _check_fraction(self.mlp, "--mlp")
        _check_fraction(self.unstructured, "--unstructured sparsity")
        for value, allowed, what in (
            (self.criterion, CRITERIA, "criterion"),
            (self.ranking, RANKINGS, "ranking"),
            (self.lrp_score, LRP_SCORES, "lrp score"),
            (self.unstructured_scope, SCOPES, "sparsity scope"),
        ):
            if value not in allowed:
                raise PruneError(f"{what} {value!r} is unknown; use one of: {', '.join(allowed)}")

    @property
    def structured(self) -> bool:
        return self.heads > 0 or self.mlp > 0

    @property
    def needs_images(self) -> bool:
        """Whether calibration images are needed: a data criterion, or recovery of a structured pruning."""
        return self.structured and (self.criterion in DATA_CRITERIA or self.recovery)

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PruneResult:
    """The pruned model (the same object that was passed in) and everything a run directory reports."""

    model: nn.Module
    config: PruneConfig
    structure: PrunedStructure
    scores: UnitScores | None
    before: ModelCost
    after: ModelCost
    calibration_images: int | None = None
    refits: list[Refit] = field(default_factory=list)
    sparsity: Sparsity | None = None

    def summary(self) -> dict[str, Any]:
        """Flat facts first (what summary.txt lists), then per-block counts, refits and sparsity."""
        return {
            **self.config.to_json_dict(),
            "heads_removed": round(removed_share(self.structure, "heads"), 4),
            "hidden_removed": round(removed_share(self.structure, "hidden"), 4),
            "params_before": self.before.params,
            "params_after": self.after.params,
            "flops_before": self.before.flops,
            "flops_after": self.after.flops,
            "calibration_images": self.calibration_images,
            "kept": self.structure.counts(),
            "refits": [refit.to_json_dict() for refit in self.refits],
            "sparsity": self.sparsity.to_json_dict() if self.sparsity else None,
        }


def prune(
    model: nn.Module,
    config: PruneConfig,
    images: torch.Tensor | None = None,
    *,
    input_size: tuple[int, int, int],
    scores: UnitScores | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` in place by ``config`` (``images``: the preprocessed calibration batch); see module doc."""
    if config.structured and images is None:
        if config.recovery:
            raise PruneError(
                "recovery refits proj and fc2 on calibration images: pass --calib-data DIR or --no-recovery"
            )
        if scores is None and config.criterion in DATA_CRITERIA:
            raise PruneError(
                f"criterion {config.criterion!r} scores units on calibration images: pass --calib-data DIR"
            )
    model.eval()
    before = model_cost(model, input_size)
    original = copy.deepcopy(model) if config.structured and config.recovery else None
    if config.structured:
        if scores is None:
            scores = score_units(
                model,
                config.criterion,
                images,
                seed=config.seed,
                lrp_score=config.lrp_score,
                batch_size=batch_size,
                progress=progress,
            )
        structure = select_structure(scores, config.heads, config.mlp, config.ranking, config.hidden_multiple)
    else:
        structure = unpruned(model)
    apply_structure(model, structure)
    refits = []
    if original is not None:
        refits = refit_consumers(model, original, structure, images, progress=progress)
    sparsity = magnitude_prune(model, config.unstructured, config.unstructured_scope) if config.unstructured else None
    after = model_cost(model, input_size)
    count = None if images is None else int(images.shape[0])
    return PruneResult(model, config, structure, scores, before, after, count, refits, sparsity)
