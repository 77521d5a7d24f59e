"""Top-1/top-5 accuracy of a classifier over a loader, the float and quantized models' common yardstick."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lrpq.errors import LrpqError

TOP5 = 5


@dataclass(frozen=True)
class EvalResult:
    """Accuracy in percent; ``top5`` is None when the model has fewer than 5 classes (it would be 100)."""

    top1: float
    top5: float | None
    n: int
    skipped: int
    seconds: float

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """Samples whose label is among the ``k`` highest logits."""
    top = logits.topk(k, dim=1).indices
    return int((top == labels.unsqueeze(1)).any(dim=1).sum())


def evaluate(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *, progress: bool = True
) -> EvalResult:
    """Evaluate in eval/inference mode; ``loader.skipped`` (if present) is reported alongside."""
    model.eval()
    start = time.perf_counter()
    n = correct1 = correct5 = 0
    num_outputs = 0
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
            logits = model(images)
            num_outputs = logits.shape[1]
            n += len(labels)
            correct1 += _count_correct(logits, labels, 1)
            if num_outputs >= TOP5:
                correct5 += _count_correct(logits, labels, TOP5)
    if n == 0:
        raise LrpqError("the evaluation loader yielded no images; check the data folder and --limit")
    return EvalResult(
        top1=100.0 * correct1 / n,
        top5=100.0 * correct5 / n if num_outputs >= TOP5 else None,
        n=n,
        skipped=int(getattr(loader, "skipped", 0)),
        seconds=time.perf_counter() - start,
    )
