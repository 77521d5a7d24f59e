"""LRP-QViT layer scores: per-image contributions over a set of images, their means, files and stability."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lrpq.allocation.solvers import relative_importance
from lrpq.ranking import kendall_tau
from lrpq.relevance.explanation import as_image_batch, explain
from lrpq.relevance.propagation import RelevanceError


@dataclass
class LayerScores:
    """Per-layer LRP-QViT scores (mean contribution over images) and the block each layer is in."""

    scores: dict[str, float]
    block_of: dict[str, str]
    block_order: list[str]
    num_images: int

    def relative(self) -> dict[str, float]:
        """Score / block total; an all-zero block carries no preference, so it is shared equally."""
        return relative_importance(self.scores, self.block_of)

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> LayerScores:
        try:
            scores = {str(name): float(value) for name, value in data["scores"].items()}
            block_of = {str(name): str(block) for name, block in data["block_of"].items()}
            loaded = cls(scores, block_of, [str(b) for b in data["block_order"]], int(data["num_images"]))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise RelevanceError(f"not a layer-score file: {error!r}") from None
        loaded.check()
        return loaded

    def check(self) -> None:
        """Every scored layer has a finite score ≥ 0 and a block listed in ``block_order``."""
        for name, score in self.scores.items():
            if not (math.isfinite(score) and score >= 0):
                raise RelevanceError(f"layer {name!r} has score {score}; scores must be finite and >= 0")
            if self.block_of.get(name) not in self.block_order:
                raise RelevanceError(f"layer {name!r} has no block in block_order")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LayerScores:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise RelevanceError(f"cannot read layer scores from {path}: {error}") from None
        try:
            return cls.from_json_dict(data)
        except RelevanceError as error:
            raise RelevanceError(f"{path}: {error}") from None

    def save_csv(self, path: str | Path) -> None:
        relative = self.relative()
        with Path(path).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["layer", "block", "score", "relative"])
            for name, score in self.scores.items():
                writer.writerow([name, self.block_of[name], repr(score), repr(relative[name])])


@dataclass
class Contributions:
    """Per-image layer contributions: the raw material of LayerScores and of the convergence study."""

    names: list[str]
    block_of: dict[str, str]
    values: np.ndarray  # (images, layers)

    def to_scores(self) -> LayerScores:
        means = self.values.mean(0)
        block_order = list(dict.fromkeys(self.block_of[name] for name in self.names))
        scores = {name: float(value) for name, value in zip(self.names, means, strict=True)}
        return LayerScores(scores, dict(self.block_of), block_order, int(self.values.shape[0]))


def _batches(images: Tensor | Iterable[Any]) -> Iterator[Tensor]:
    if isinstance(images, Tensor):
        images = [images]
    for item in images:
        yield as_image_batch(item)


def collect_contributions(
    model: nn.Module,
    images: Tensor | Iterable[Any],
    target: int | None = None,
    progress: bool = True,
    stop_tau: float | None = None,
    check_every: int = 10,
) -> Contributions:
    """Per-image contributions over ``images`` (batches, single images or (images, labels) pairs).

    With ``stop_tau``, every ``check_every`` images the running score ranking is compared with the
    one at the previous check; once Kendall's τ reaches ``stop_tau`` the remaining images are skipped.
    """
    rows: list[np.ndarray] = []
    names: list[str] = []
    block_of: dict[str, str] = {}
    previous: np.ndarray | None = None
    next_check = check_every
    with tqdm(desc="relevance", unit="img", disable=not progress) as bar:
        for batch in _batches(images):
            explanation = explain(model, batch, target)
            names, block_of = list(explanation.contributions), explanation.block_of
            rows.extend(torch.stack(list(explanation.contributions.values()), 1).double().cpu().numpy())
            bar.update(batch.shape[0])
            if stop_tau is None or len(rows) < next_check:
                continue
            current = np.mean(rows, 0)
            if previous is not None and kendall_tau(previous, current) >= stop_tau:
                break
            previous, next_check = current, len(rows) + check_every
    if not rows:
        raise RelevanceError("no images to compute relevance scores from")
    return Contributions(names, block_of, np.stack(rows))


def compute_layer_scores(
    model: nn.Module,
    images: Tensor | Iterable[Any],
    target: int | None = None,
    progress: bool = True,
    stop_tau: float | None = None,
    check_every: int = 10,
) -> LayerScores:
    """LRP-QViT layer scores of ``model`` over ``images``; see collect_contributions for the options."""
    return collect_contributions(model, images, target, progress, stop_tau, check_every).to_scores()


def ranking_stability(
    per_image: np.ndarray | Sequence[Sequence[float]], checkpoints: Iterable[int]
) -> list[tuple[int, float]]:
    """Kendall's τ between the score ranking of the first n images and that of all of them, per n."""
    values = np.asarray(per_image, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
        raise RelevanceError("per-image contributions must be a non-empty (images, layers) array")
    full = values.mean(0)
    result = []
    for n in checkpoints:
        if not 1 <= n <= values.shape[0]:
            raise RelevanceError(f"checkpoint {n} is outside 1..{values.shape[0]} images")
        result.append((n, kendall_tau(values[:n].mean(0), full)))
    return result
