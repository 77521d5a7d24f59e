"""Top-1/top-5 on a toy model with known logits, paired comparisons, skipped images, and the shared ref-A model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from lrpq.data import make_loader
from lrpq.errors import LrpqError
from lrpq.evaluate import Comparison, EvalResult, PairedGap, compare, evaluate
from lrpq.models import build_model, resolve_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"reference models/data not found at {SHARED}")

# Row i holds the logits for sample i; the comments give each label's rank in its row.
LOGITS = torch.tensor(
    [
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 0: top-1
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 4: rank 5, top-5 only
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 5: rank 6, neither
        [0.0, 1.0, 9.0, 2.0, 3.0, 4.0],  # label 2: top-1
    ]
)
LABELS = torch.tensor([0, 4, 5, 2])


class LookupModel(nn.Module):
    """Returns a fixed logit row per sample index, so accuracies are known exactly."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.logits[index]


def batches(labels: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(sample indices, labels) batches: the indices are the LookupModel's input."""
    indices = torch.arange(len(labels))
    return [(indices[i : i + size], labels[i : i + size]) for i in range(0, len(labels), size)]


def test_known_outputs_give_exact_top1_and_top5() -> None:
    model = LookupModel(LOGITS).train()
    result = evaluate(model, batches(LABELS, 3), progress=False)
    assert (result.top1, result.top5, result.n, result.skipped) == (50.0, 75.0, 4, 0)
    assert result.correct == (True, False, False, True)  # per image, in loader order across batches
    assert result.seconds >= 0
    assert not model.training


def test_top5_is_none_below_five_classes() -> None:
    result = evaluate(LookupModel(LOGITS[:, :4]), batches(torch.tensor([0, 3, 1, 2]), 2), progress=False)
    assert result.top1 == 50.0  # samples 0 and 3 (argmax 0 and 2) are right
    assert result.top5 is None


def test_result_json_and_empty_loader() -> None:
    result = EvalResult(top1=12.5, top5=None, n=8, skipped=1, seconds=0.5)
    assert result.to_json_dict() == {"top1": 12.5, "top5": None, "n": 8, "skipped": 1, "seconds": 0.5}
    with pytest.raises(LrpqError, match="yielded no images"):
        evaluate(LookupModel(LOGITS), [], progress=False)


# Six samples, labels all 0; which of model / reference predicts class 0 per sample:
# both, both, model only, reference only, reference only, neither.
PAIR_LABELS = torch.zeros(6, dtype=torch.long)
MODEL_RIGHT = [True, True, True, False, False, False]
REFERENCE_RIGHT = [True, True, False, True, True, False]


def _logits_right_where(right: list[bool], wrong_class: int) -> torch.Tensor:
    """Three-class logits predicting class 0 where ``right`` and ``wrong_class`` elsewhere."""
    rows = [[1.0, 0.0, 0.0] if ok else [0.0, float(wrong_class == 1), float(wrong_class == 2)] for ok in right]
    return torch.tensor(rows)


def test_compare_counts_discordant_images_and_the_paired_interval() -> None:
    # Only samples 0 and 1 agree: sample 5 is wrong under both but as class 1 vs class 2.
    model = LookupModel(_logits_right_where(MODEL_RIGHT, wrong_class=1))
    reference = LookupModel(_logits_right_where(REFERENCE_RIGHT, wrong_class=2)).train()
    comparison = compare(model, reference, batches(PAIR_LABELS, 4), progress=False)
    assert (comparison.result.top1, comparison.reference.top1) == (50.0, pytest.approx(400 / 6))
    assert (comparison.right_only_model, comparison.right_only_reference) == (1, 2)
    assert comparison.agreement == pytest.approx(200 / 6)
    assert comparison.difference == pytest.approx(-100 / 6)
    # Per-sample differences (0, 0, 1, -1, -1, 0): mean -1/6, E[d^2] = 3/6, var = (1/2 - 1/36) / 6.
    half = 100 * 1.959964 * math.sqrt((0.5 - 1 / 36) / 6)
    low, high = comparison.confidence_interval()
    assert (low, high) == (pytest.approx(-100 / 6 - half), pytest.approx(-100 / 6 + half))
    assert comparison.result.n == comparison.reference.n == 6
    assert not reference.training


def test_paired_gap_between_stored_results_equals_the_comparison() -> None:
    model = LookupModel(_logits_right_where(MODEL_RIGHT, wrong_class=1))
    reference = LookupModel(_logits_right_where(REFERENCE_RIGHT, wrong_class=2))
    loader = batches(PAIR_LABELS, 4)
    gap = PairedGap.between(evaluate(model, loader, progress=False), evaluate(reference, loader, progress=False))
    comparison = compare(model, reference, loader, progress=False)
    assert (gap.n, gap.right_only_model, gap.right_only_reference) == (6, 1, 2)
    assert gap == comparison.gap
    assert gap.confidence_interval() == comparison.confidence_interval()


def test_paired_gap_needs_per_image_results_on_the_same_images() -> None:
    four = EvalResult(50.0, None, 4, 0, 1.0, correct=(True, False, True, False))
    three = EvalResult(100 / 3, None, 3, 0, 1.0, correct=(True, False, False))
    summary_only = EvalResult(50.0, None, 4, 0, 1.0)
    with pytest.raises(LrpqError, match="got 4 and 3 images"):
        PairedGap.between(four, three)
    with pytest.raises(LrpqError, match="got 0 and 4 images"):
        PairedGap.between(summary_only, four)


def test_compare_of_identical_models_has_a_zero_width_interval() -> None:
    model = LookupModel(LOGITS)
    comparison = compare(model, model, batches(LABELS, 3), progress=False)
    assert (comparison.agreement, comparison.difference, comparison.confidence_interval()) == (100.0, 0.0, (0.0, 0.0))
    assert comparison.result == comparison.reference


def test_comparison_json_and_empty_loader() -> None:
    result = EvalResult(top1=50.0, top5=None, n=4, skipped=0, seconds=1.0)
    reference = EvalResult(top1=75.0, top5=None, n=4, skipped=0, seconds=1.0)
    comparison = Comparison(result, reference, 75.0, 0, 1)
    payload = comparison.to_json_dict()
    assert payload["top1"] == 50.0 and payload["reference"]["top1"] == 75.0
    assert (payload["agreement"], payload["right_only_model"], payload["right_only_reference"]) == (75.0, 0, 1)
    assert payload["difference"] == -25.0
    assert payload["difference_ci95"] == list(comparison.confidence_interval())
    with pytest.raises(LrpqError, match="yielded no images"):
        compare(LookupModel(LOGITS), LookupModel(LOGITS), [], progress=False)


def test_skipped_images_are_reported(tmp_path: Path) -> None:
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4), colour).save(tmp_path / name / "0.png")
    (tmp_path / "a" / "bad.png").write_bytes(b"\x89PNG truncated")
    config = {"input_size": (3, 4, 4), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
    loader = make_loader(tmp_path, config, classes=None, num_classes=2, batch_size=4)
    # Three outputs, the channel means: red "a" -> class 0 (right), blue "b" -> class 2 (wrong).
    model = nn.Sequential(nn.Flatten(1), nn.Unflatten(1, (3, 16)), nn.AdaptiveAvgPool1d(1), nn.Flatten(1))
    with pytest.warns(UserWarning, match="skipped 1"):
        result = evaluate(model, loader, progress=False)
    assert (result.n, result.skipped, result.top1, result.top5) == (2, 1, 50.0, None)


@needs_shared
def test_shared_ref_a_accuracy_on_a_dev_subset() -> None:
    spec = resolve_model(str(SHARED / "models" / "vit_cifar10.json"))
    dev = SHARED / "data" / "cifar10" / "dev"
    loader = make_loader(dev, spec.data_config, spec.classes, num_classes=10, batch_size=100, limit=500)
    result = evaluate(build_model(spec), loader, progress=False)
    assert result.n == 500 and result.skipped == 0
    # Measured 67.6 % top-1 / 98.2 % top-5 on this evenly spaced subset (card: 69.1 % on all 5000).
    assert result.top1 > 60.0
    assert result.top5 is not None and result.top5 > 95.0
