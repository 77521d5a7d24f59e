"""``learnable``: gradients reach what is learned, nothing else changes, and hardening is exact."""

from __future__ import annotations

import pytest
import torch
from recovery_helpers import grids, student_and_teacher

from lrpq.api import weighted_layers
from lrpq.quantizers import UniformQuantizer
from lrpq.recovery import LEARNABLE, learnable
from lrpq.recovery.learnable import LearnedRounding, LearnedScaleQuantizer


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_entering_and_leaving_without_a_step_changes_nothing(family: str) -> None:
    student, _, images = student_and_teacher(family)
    with torch.inference_mode():
        before = student(images)
    state = {key: value.clone() for key, value in student.state_dict().items()}
    with learnable(student, LEARNABLE) as trainable:
        pass
    assert trainable.changed_levels == 0
    assert state.keys() == student.state_dict().keys()
    for key, value in student.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.inference_mode():
        after = student(images)
    assert torch.equal(before, after)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_the_stand_ins_compute_the_quantized_model_bit_for_bit(family: str) -> None:
    student, _, images = student_and_teacher(family)
    with torch.no_grad():
        quantized = student(images)
        with learnable(student, LEARNABLE):
            trained_on = student(images)
    assert torch.equal(trained_on, quantized)


def test_gradients_reach_rounding_scales_and_floats_only() -> None:
    student, _, images = student_and_teacher()
    with learnable(student, LEARNABLE) as trainable:
        student(images).square().sum().backward()
        assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in trainable.rounding_parameters)
        reached = [p for p in trainable.scales if p.grad is not None]
        assert len(reached) >= len(trainable.scales) - 1  # all but the head's input, only reached via the logits
        assert all(p.grad.abs() > 0 for p in reached)
        assert all(p.grad is not None for p in trainable.floats)
        learned = {id(p) for p in [*trainable.floats, *trainable.scales, *trainable.rounding_parameters]}
        assert all(p.grad is None for p in student.parameters() if id(p) not in learned)
        counts = trainable.counts()
    assert counts["rounding"] == sum(layer.weight.numel() for layer in weighted_layers(student).values())
    assert all(p.requires_grad for p in student.parameters())  # restored to what they were


def test_only_the_chosen_groups_are_learned() -> None:
    student, _, _ = student_and_teacher()
    with learnable(student, ("norms",)) as trainable:
        assert not trainable.rounding and not trainable.scales
        assert trainable.floats and all(p.dim() == 1 for p in trainable.floats)
    with pytest.raises(ValueError, match="cannot learn"), learnable(student, ("weights",)):
        pass


def test_the_levels_trained_on_are_the_levels_kept_exactly() -> None:
    student, _, _ = student_and_teacher(bits=3)
    layers = weighted_layers(student)
    trained_weights = {}
    generator = torch.Generator().manual_seed(0)
    with learnable(student, ("rounding",)) as trainable:
        for name, layer in layers.items():
            rounding = layer.weight_quantizer
            assert isinstance(rounding, LearnedRounding)
            with torch.no_grad():  # any V: the forward has used [h(V) ≥ ½] all along
                rounding.v.normal_(generator=generator)
            trained_weights[name] = rounding(layer.weight).detach().clone()
    assert trainable.changed_levels > 0
    for name, layer in layers.items():
        quantizer = layer.weight_quantizer
        assert torch.equal(quantizer(layer.weight), trained_weights[name]), name
        assert quantizer.rounding_offset.dtype == torch.int8
        codes = quantizer.codes(layer.weight)
        assert codes.min() >= 0 and codes.max() <= 2**quantizer.bits - 1


def test_grids_keep_their_widths_and_integer_zero_points() -> None:
    student, _, images = student_and_teacher()
    before = grids(student)
    weight_scales = {name: layer.weight_quantizer.scale.clone() for name, layer in weighted_layers(student).items()}
    with learnable(student, LEARNABLE) as trainable, torch.no_grad():
        for p in trainable.scales:
            p.fill_(0.3)
    after = grids(student)
    assert before.keys() == after.keys()
    for name, (bits, zero_point) in before.items():
        assert after[name][0] == bits
        if zero_point is not None:
            assert torch.equal(after[name][1], zero_point)
    for name, layer in weighted_layers(student).items():
        assert torch.equal(layer.weight_quantizer.scale, weight_scales[name])
    with torch.inference_mode():
        assert torch.isfinite(student(images)).all()


def test_an_error_inside_puts_the_quantizers_back_unchanged() -> None:
    student, _, _ = student_and_teacher()
    state = {key: value.clone() for key, value in student.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), learnable(student, LEARNABLE) as trainable:
        with torch.no_grad():
            for p in trainable.scales + trainable.rounding_parameters:
                p.add_(1.0)
        raise RuntimeError("boom")
    for key, value in student.state_dict().items():
        assert torch.equal(value, state[key]), key


def _uniform_stand_in(student: torch.nn.Module) -> LearnedScaleQuantizer:
    stand_ins = [m for m in student.modules() if isinstance(m, LearnedScaleQuantizer)]
    return next(m for m in stand_ins if isinstance(m.quantizer[0], UniformQuantizer))


def test_qdrop_passes_each_element_float_or_quantized_at_its_rate() -> None:
    student, _, _ = student_and_teacher()
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    weight, shift = torch.rand(256, generator=torch.Generator().manual_seed(2)) + 0.5, torch.full((256,), 0.1)
    with learnable(student, LEARNABLE, drop=0.25):
        stand_in = _uniform_stand_in(student)
        torch.manual_seed(0)
        dropped, dropped_affine = stand_in(x), stand_in.fake_quant(x, affine=(weight, shift))
        stand_in.drop = 0.0
        quantized, quantized_affine = stand_in(x), stand_in.fake_quant(x, affine=(weight, shift))
    for out, exact, codes in ((dropped, x, quantized), (dropped_affine, x * weight + shift, quantized_affine)):
        kept_float = torch.isclose(out, exact, rtol=1e-6, atol=1e-6) & (out != codes)  # x·w + c fused: within an ulp
        assert torch.all(kept_float | (out == codes))
        differing = (~torch.isclose(exact, codes, rtol=1e-6, atol=1e-6)).sum()
        assert abs(kept_float.sum() / differing - 0.25) < 0.02  # 16,384 draws: σ of the share ≈ 0.004


def test_qdrop_keeps_gradients_of_both_paths_and_refuses_a_bad_rate() -> None:
    student, _, images = student_and_teacher()
    with learnable(student, LEARNABLE, drop=0.5) as trainable:
        torch.manual_seed(0)
        student(images).square().sum().backward()
        assert all(p.grad is not None for p in trainable.floats)
        assert all(p.grad is not None and p.grad.abs() > 0 for p in trainable.scales[:-1])
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="QDrop's probability"), learnable(student, LEARNABLE, drop=bad):
            pass
