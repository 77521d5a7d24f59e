"""Unit scores: how much each attention head and MLP hidden channel of every block is worth keeping.

Every criterion gives each unit a score, higher = keep; ``lrpq.prune.selection`` keeps the best.

- ``lrp`` — relevance of the unit's output on the calibration images (``lrpq.prune.lrp_scores``).
- ``l1`` (Li et al., ICLR 2017) — L1 norm of the weights that produce the unit: a head's q, k and v
  rows of ``qkv``, a hidden channel's row of ``fc1``.
- ``slimming`` (Liu et al., ICCV 2017) — the scale of the unit. Network Slimming reads BN's γ, the
  factor a channel's normalised pre-activation is multiplied by. A head's output (a convex mix of its
  values) reaches the residual stream through its ``proj`` columns and LayerScale γ₁, so its scale is
  ‖γ₁ ⊙ W_proj[:, head]‖_F. A ViT hidden channel has no own γ: its pre-activation is fc1's row
  applied to norm2's output (normalised per token, as BN's x̂), so that row's norm plays γ's role,
  and its GELU output reaches the stream through γ₂ ⊙ fc2's column; the score is the product of the
  two norms, which is what γ would be if GELU were linear. It is a baseline: no sparsity was trained in.
- ``thinet`` (Luo et al., ICCV 2017) and ``regression`` (He et al., ICCV 2017) — from how well the
  consumer's output is reconstructed without the unit (``lrpq.prune.reconstruction``).
- ``random`` — uniform scores from ``seed``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lrpq.errors import LrpqError
from lrpq.prune.lrp_scores import DEFAULT_LRP_SCORE, LRP_SCORES, lrp_unit_scores
from lrpq.prune.reconstruction import contribution_grams, regression_scores, thinet_scores
from lrpq.prune.structure import UNIT_KINDS, branch_scale, head_channels, head_dim, prunable_blocks

CRITERIA = ("lrp", "l1", "slimming", "thinet", "regression", "random")
DATA_CRITERIA = ("lrp", "thinet", "regression")  # the ones that read calibration images

BlockScores = dict[str, np.ndarray]  # "heads" → (num_heads,), "hidden" → (hidden_features,)


class CriterionError(LrpqError):
    """An unknown criterion, a criterion without the images it needs, or a score file that cannot be read."""


@dataclass
class UnitScores:
    """Scores of every prunable block's heads and hidden channels (higher = keep) and how they were made."""

    criterion: str
    blocks: dict[str, BlockScores]
    details: dict[str, Any] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        blocks = {name: {kind: scores[kind].tolist() for kind in UNIT_KINDS} for name, scores in self.blocks.items()}
        return {"criterion": self.criterion, "details": self.details, "blocks": blocks}

    @classmethod
    def from_json_dict(cls, data: Any) -> UnitScores:
        try:
            blocks = {
                str(name): {kind: np.asarray(scores[kind], dtype=np.float64) for kind in UNIT_KINDS}
                for name, scores in data["blocks"].items()
            }
            return cls(str(data["criterion"]), blocks, dict(data.get("details", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CriterionError(f"not a unit-score file: {error!r}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> UnitScores:
        try:
            return cls.from_json_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise CriterionError(f"cannot read unit scores from {path}: {error}") from None


def _per_head(values: torch.Tensor, heads: int) -> torch.Tensor:
    """Sum a per-channel quantity over each head's channels (head-major, as timm lays heads out)."""
    return values.reshape(heads, -1).sum(1)


def l1_scores(block: nn.Module) -> BlockScores:
    """Li et al.: L1 norm of the weights producing the unit (q, k, v rows of a head; fc1 row of a channel)."""
    attn = block.attn
    rows = attn.qkv.weight.detach().abs().sum(1).reshape(3, -1).sum(0)  # q + k + v row norms, per channel
    return {
        "heads": _per_head(rows, attn.num_heads).double().numpy(),
        "hidden": block.mlp.fc1.weight.detach().abs().sum(1).double().numpy(),
    }


def slimming_scores(block: nn.Module) -> BlockScores:
    """Network Slimming's scale: ‖γ₁ ⊙ proj columns‖ per head, ‖fc1 row‖·‖γ₂ ⊙ fc2 column‖ per hidden channel."""
    attn, mlp = block.attn, block.mlp
    proj = attn.proj.weight.detach() * branch_scale(block, "attn").unsqueeze(1)
    heads = torch.stack(
        [proj[:, head_channels([h], head_dim(attn))].norm() for h in range(attn.num_heads)]  # Frobenius
    )
    fc2 = mlp.fc2.weight.detach() * branch_scale(block, "mlp").unsqueeze(1)
    hidden = mlp.fc1.weight.detach().norm(dim=1) * fc2.norm(dim=0)
    return {"heads": heads.double().numpy(), "hidden": hidden.double().numpy()}


def random_scores(model: nn.Module, seed: int) -> dict[str, BlockScores]:
    """Uniform scores drawn block by block from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: {
            "heads": torch.rand(block.attn.num_heads, generator=generator, dtype=torch.float64).numpy(),
            "hidden": torch.rand(block.mlp.fc1.out_features, generator=generator, dtype=torch.float64).numpy(),
        }
        for name, block in prunable_blocks(model).items()
    }


def _weight_scores(model: nn.Module, score: Callable[[nn.Module], BlockScores]) -> dict[str, BlockScores]:
    return {name: score(block) for name, block in prunable_blocks(model).items()}


def score_units(
    model: nn.Module,
    criterion: str,
    images: torch.Tensor | None = None,
    *,
    seed: int = 0,
    lrp_score: str = DEFAULT_LRP_SCORE,
    batch_size: int = 8,
    progress: bool = True,
) -> UnitScores:
    """Score every prunable unit of ``model`` by ``criterion`` (``images``: preprocessed calibration batch)."""
    if criterion not in CRITERIA:
        raise CriterionError(f"criterion {criterion!r} is unknown; use one of: {', '.join(CRITERIA)}")
    if criterion in DATA_CRITERIA and images is None:
        raise CriterionError(f"criterion {criterion!r} needs calibration images (pass --calib-data DIR)")
    details: dict[str, Any] = {}
    if criterion in DATA_CRITERIA:
        details["images"] = int(images.shape[0])
    if criterion == "lrp":
        if lrp_score not in LRP_SCORES:
            raise CriterionError(f"lrp score {lrp_score!r} is unknown; use one of: {', '.join(LRP_SCORES)}")
        blocks = lrp_unit_scores(model, images, lrp_score, batch_size=batch_size, progress=progress)
        details["lrp_score"] = lrp_score
    elif criterion in ("thinet", "regression"):
        grams = contribution_grams(model, images, batch_size=batch_size, progress=progress)
        method = thinet_scores if criterion == "thinet" else regression_scores
        blocks = {name: {kind: method(gram[kind]) for kind in UNIT_KINDS} for name, gram in grams.items()}
    elif criterion == "random":
        blocks = random_scores(model, seed)
        details["seed"] = seed
    else:
        blocks = _weight_scores(model, l1_scores if criterion == "l1" else slimming_scores)
    return UnitScores(criterion, blocks, details)
