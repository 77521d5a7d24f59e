"""``recover`` on tiny models: it lowers its loss, keeps every grid, is deterministic, and runs every loss."""

from __future__ import annotations

import copy

import pytest
import torch
from recovery_helpers import grids, student_and_teacher

from lrpq.api import quantizers
from lrpq.config import QuantConfig
from lrpq.distill import LOSSES, FeatureShapes, build_loss, extract_features
from lrpq.quantizers import UniformQuantizer
from lrpq.recovery import LEARNABLE, RecoveryConfig, RecoveryError, recover
from lrpq.runs import effective_plan

FAST = {"batch_size": 4, "augment": False}


def objective_value(student: torch.nn.Module, teacher: torch.nn.Module, images: torch.Tensor, spec: str) -> float:
    """The (connector-free) loss ``spec`` of the student on all of ``images``, quantizers as they are."""
    with torch.no_grad():
        target = extract_features(teacher, images, attention=False)
        features = extract_features(student, images, attention=False)
        return build_loss(spec, FeatureShapes.of(target, len(images)))(features, target).item()


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_recovery_lowers_its_loss(family: str) -> None:
    student, teacher, images = student_and_teacher(family, bits=3)
    before = objective_value(student, teacher, images, "mse")
    report = recover(student, teacher, images, RecoveryConfig(steps=100, **FAST), progress=False)
    after = objective_value(student, teacher, images, "mse")
    assert after < 0.98 * before  # random tiny models with GPTQ rounding: mostly noise no trainable set can undo
    assert report.steps == 100 and len(report.curve) == 10 and report.seconds > 0
    assert report.last_loss < report.first_loss


def test_recovery_keeps_the_bit_plan_widths_and_integer_zero_points() -> None:
    student, teacher, images = student_and_teacher(bits=4)
    plan = effective_plan(student, QuantConfig(4, 4))
    before = grids(student)
    recover(student, teacher, images, RecoveryConfig(steps=5, **FAST), progress=False)
    assert effective_plan(student, QuantConfig(4, 4)) == plan
    after = grids(student)
    assert {name: bits for name, (bits, _) in after.items()} == {name: bits for name, (bits, _) in before.items()}
    for name, quantizer in quantizers(student).items():
        assert torch.isfinite(quantizer.scale).all() and (quantizer.scale > 0).all(), name
        if isinstance(quantizer, UniformQuantizer):
            zero_point = quantizer.zero_point
            assert torch.equal(zero_point, before[name][1]), name
            assert torch.equal(zero_point, zero_point.round()) and zero_point.min() >= 0
            assert zero_point.max() <= 2**quantizer.bits - 1


def _recovered_state(**config: object) -> dict[str, torch.Tensor]:
    """The state of a fresh tiny student after a recovery with ``config`` (batches of 4)."""
    student, teacher, images = student_and_teacher()
    recover(student, teacher, images, RecoveryConfig(batch_size=4, **config), progress=False)
    return student.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[key], b[key]) for key in a)


def test_recovery_is_deterministic_given_its_seed() -> None:
    states = [_recovered_state(steps=4, seed=seed) for seed in (0, 0, 1)]
    assert _same(states[0], states[1])
    assert not _same(states[0], states[2])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_drives_a_recovery(name: str) -> None:
    student, teacher, images = student_and_teacher()
    original = copy.deepcopy(student.state_dict())
    report = recover(student, teacher, images, RecoveryConfig(loss=name, steps=2, **FAST), progress=False)
    assert report.loss == name and all(map(torch.isfinite, map(torch.tensor, report.curve)))
    assert any(not torch.equal(value, original[key]) for key, value in student.state_dict().items())


def test_rounding_that_moves_no_level_leaves_the_default_recovery_unchanged() -> None:
    """The default does not learn the rounding because, where no weight changes level, learning it gives the
    very same model at a quarter more time: its stand-in computes the cached quantized weights exactly and
    touches no other variable, random draw or rate."""
    assert "rounding" not in RecoveryConfig().learn
    default = _recovered_state(steps=4)
    assert _same(default, _recovered_state(steps=4, learn=LEARNABLE, lr_rounding=0.0))
    assert not _same(default, _recovered_state(steps=4, learn=LEARNABLE, lr_rounding=0.1))


def test_recovery_refuses_a_single_image() -> None:
    student, teacher, images = student_and_teacher()
    with pytest.raises(RecoveryError, match="at least 2 images"):
        recover(student, teacher, images[:1], RecoveryConfig(steps=1), progress=False)


def test_qdrop_changes_what_is_learned_deterministically_and_only_when_asked() -> None:
    states = [_recovered_state(steps=3, drop=drop) for drop in (0.0, 0.5, 0.5)]
    assert _same(states[1], states[2])
    assert not _same(states[0], states[1])
    with pytest.raises(RecoveryError, match=r"drop=1\.0 must be a probability in \[0, 1\)"):
        RecoveryConfig(drop=1.0)
