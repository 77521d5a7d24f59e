"""Properties every loss of the catalogue shares: zero (or minimal) at the teacher, gradients where they belong."""

from __future__ import annotations

import pytest
import torch
from distill_synthetic import BATCH, copy_of, leaves, teacher_features

from lrpq.distill import LOSSES, FeatureShapes, build_loss

# Likelihood and contrastive losses are not zero at the teacher, only lower than at a perturbed student.
NOT_ZERO_AT_TEACHER = {"vid", "crd"}


def _shapes() -> FeatureShapes:
    return FeatureShapes.of(teacher_features(), num_images=BATCH)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_zero_or_minimal_when_the_student_copies_the_teacher(name: str) -> None:
    teacher = teacher_features()
    at_teacher = build_loss(name, _shapes())(copy_of(teacher), teacher).item()
    perturbed = build_loss(name, _shapes())(copy_of(teacher, noise=1.5), teacher).item()
    if name in NOT_ZERO_AT_TEACHER:
        assert at_teacher < perturbed
    else:
        assert at_teacher == pytest.approx(0.0, abs=1e-6)
        assert perturbed > 1e-6


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_reach_the_student_and_the_loss_but_never_the_teacher(name: str) -> None:
    teacher = copy_of(teacher_features())  # leaves that require grad: the loss must still not touch them
    student = copy_of(teacher_features(), noise=1.5)
    loss = build_loss(name, _shapes())
    value = loss(student, teacher)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert all(t.grad is None for t in leaves(teacher))
    assert any(s.grad is not None and s.grad.abs().sum() > 0 for s in leaves(student))
    assert all(torch.isfinite(s.grad).all() for s in leaves(student) if s.grad is not None)
    for parameter_name, parameter in loss.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name


def test_losses_with_learnable_parts_expose_them_as_parameters() -> None:
    learnable = {name for name in LOSSES if any(True for _ in build_loss(name, _shapes()).parameters())}
    assert learnable == {"fitnet", "vid", "ft", "crd", "ofd"}
