"""Top-1/top-5 accuracy of a classifier over a loader, the float and quantized models' common yardstick.

``compare`` runs a quantized model and its float original on the same images and counts where
their predictions differ: a paired comparison, whose uncertainty on the top-1 gap is far smaller
than the two accuracies' own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lrpq.devices import model_device
from lrpq.errors import LrpqError

TOP5 = 5
# Two-sided 95 % quantile of the standard normal, for the paired confidence interval.
Z_95 = 1.959964


@dataclass(frozen=True)
class EvalResult:
    """Accuracy in percent; ``top5`` is None when the model has fewer than 5 classes (it would be 100).

    ``seconds`` is the wall time of the pass that produced it (a comparison's pass runs both models).
    ``correct`` says, image by image in loader order, whether the top-1 prediction was right: what a
    paired comparison of two results on the same images needs (``PairedGap.between``).
    """

    top1: float
    top5: float | None
    n: int
    skipped: int
    seconds: float
    correct: tuple[bool, ...] = field(default=(), repr=False, compare=False)

    def to_json_dict(self) -> dict[str, Any]:
        """The summary numbers; the per-image ``correct`` is left to callers that store it their way."""
        return {"top1": self.top1, "top5": self.top5, "n": self.n, "skipped": self.skipped, "seconds": self.seconds}


def _correct_at(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per sample: is the label among the ``k`` highest logits."""
    return (logits.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1)


class _Tally:
    """Running top-1/top-5 counts of one model."""

    def __init__(self) -> None:
        self.n = self.correct1 = self.correct5 = self.num_outputs = 0
        self.correct: list[bool] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Count one batch; returns the predicted classes it counted top-1 with."""
        predicted = logits.argmax(1)
        right = predicted == labels
        self.num_outputs = logits.shape[1]
        self.n += len(labels)
        self.correct1 += int(right.sum())
        self.correct.extend(right.tolist())
        if self.num_outputs >= TOP5:
            self.correct5 += int(_correct_at(logits, labels, TOP5).sum())
        return predicted

    def result(self, skipped: int, seconds: float) -> EvalResult:
        if self.n == 0:
            raise LrpqError("the evaluation loader yielded no images; check the data folder and --limit")
        return EvalResult(
            top1=100.0 * self.correct1 / self.n,
            top5=100.0 * self.correct5 / self.n if self.num_outputs >= TOP5 else None,
            n=self.n,
            skipped=skipped,
            seconds=seconds,
            correct=tuple(self.correct),
        )


def evaluate(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *, progress: bool = True
) -> EvalResult:
    """Evaluate in eval/inference mode; ``loader.skipped`` (if present) is reported alongside."""
    model.eval()
    device = model_device(model)
    start = time.perf_counter()
    tally = _Tally()
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
            tally.add(model(images.to(device, non_blocking=True)).cpu(), labels)
    return tally.result(int(getattr(loader, "skipped", 0)), time.perf_counter() - start)


@dataclass(frozen=True)
class PairedGap:
    """The top-1 gap between a model and a reference on the same ``n`` images.

    Only images where exactly one of the two is right move the gap, so its uncertainty comes from how
    many those are: per image the difference is −1, 0 or 1, and the interval is the normal
    approximation ``mean ± z·sd/√n`` of that paired difference (McNemar's setting). Treating the two
    accuracies as independent samples would overstate it: on 600 images with 23 discordant ones the
    paired half-width is 1.6 points, the unpaired one 4.0.
    """

    n: int
    right_only_model: int
    right_only_reference: int

    @classmethod
    def between(cls, model: EvalResult, reference: EvalResult) -> PairedGap:
        """The gap of two results' per-image correctness, which must cover the same images."""
        if not model.correct or len(model.correct) != len(reference.correct):
            raise LrpqError(
                f"a paired gap needs both results' per-image correctness on the same images; "
                f"got {len(model.correct)} and {len(reference.correct)} images"
            )
        pairs = list(zip(model.correct, reference.correct, strict=True))
        return cls(len(pairs), sum(a and not b for a, b in pairs), sum(b and not a for a, b in pairs))

    @property
    def difference(self) -> float:
        """Top-1 of the model minus the reference's, in points."""
        return 100.0 * (self.right_only_model - self.right_only_reference) / self.n

    def confidence_interval(self, z: float = Z_95) -> tuple[float, float]:
        """``difference`` ± z standard errors of the paired per-image difference, in points."""
        mean = self.difference / 100.0
        variance = max(0.0, (self.right_only_model + self.right_only_reference) / self.n - mean**2) / self.n
        half = 100.0 * z * math.sqrt(variance)
        return self.difference - half, self.difference + half


@dataclass(frozen=True)
class Comparison:
    """A model and a reference (its float original) on the same images, prediction by prediction.

    The top-1 gap and its interval are a ``PairedGap``'s; ``agreement`` also counts images on which
    both are wrong with different classes.
    """

    result: EvalResult
    reference: EvalResult
    agreement: float  # % of images on which both predict the same class
    right_only_model: int
    right_only_reference: int

    @property
    def gap(self) -> PairedGap:
        return PairedGap(self.result.n, self.right_only_model, self.right_only_reference)

    @property
    def difference(self) -> float:
        """Top-1 of the model minus the reference's, in points."""
        return self.gap.difference

    def confidence_interval(self, z: float = Z_95) -> tuple[float, float]:
        """``difference`` ± z standard errors of the paired per-image difference, in points."""
        return self.gap.confidence_interval(z)

    def to_json_dict(self) -> dict[str, Any]:
        low, high = self.confidence_interval()
        return {
            **self.result.to_json_dict(),
            "reference": self.reference.to_json_dict(),
            "agreement": self.agreement,
            "right_only_model": self.right_only_model,
            "right_only_reference": self.right_only_reference,
            "difference": self.difference,
            "difference_ci95": [low, high],
        }


def compare(
    model: nn.Module,
    reference: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    progress: bool = True,
) -> Comparison:
    """Evaluate ``model`` and ``reference`` batch by batch on one pass over ``loader``."""
    model.eval()
    reference.eval()
    devices = model_device(model), model_device(reference)
    start = time.perf_counter()
    tallies = _Tally(), _Tally()
    agree = 0
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc="compare", unit="batch", disable=not progress, leave=False):
            predicted = [
                tally.add(net(images.to(device, non_blocking=True)).cpu(), labels)
                for tally, net, device in zip(tallies, (model, reference), devices, strict=True)
            ]
            agree += int((predicted[0] == predicted[1]).sum())
    skipped, seconds = int(getattr(loader, "skipped", 0)), time.perf_counter() - start
    result, reference_result = (tally.result(skipped, seconds) for tally in tallies)
    gap = PairedGap.between(result, reference_result)
    agreement = 100.0 * agree / result.n
    return Comparison(result, reference_result, agreement, gap.right_only_model, gap.right_only_reference)
