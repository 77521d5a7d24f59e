"""capture_features on tiny timm models, float and lrpq-prepared: shapes, values, and a clean exit."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import build_tiny, tiny_input
from torch import nn

from lrpq.api import prepare, quantize
from lrpq.config import QuantConfig
from lrpq.distill import BlockMSE, DistillError, capture_features, extract_features

BATCH = 2


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        num_heads=2,
        embed_dim=32,
        num_classes=10,
    ).eval()


def images(size: int) -> torch.Tensor:
    return torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def fused_flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.fused_attn for name, m in model.named_modules() if hasattr(m, "fused_attn")}


def expected_pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


def check_bundle(model: nn.Module, x: torch.Tensor, tokens: list[tuple], attention: list[tuple], embed: int) -> None:
    """Shapes as given, attention rows summing to 1, the model's own logits and pre-logits, nothing left behind."""
    flags, hooks = fused_flags(model), hook_count(model)
    with torch.no_grad():
        reference, pre_logits = model(x), expected_pre_logits(model, x)
        features = extract_features(model, x)
    assert [tuple(t.shape) for t in features.tokens] == tokens
    assert [tuple(a.shape) for a in features.attention] == attention
    for probabilities in features.attention:
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(probabilities.shape[:-1]))
        assert (probabilities >= 0).all()
    assert features.embedding.shape == (BATCH, embed)
    torch.testing.assert_close(features.logits, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.embedding, pre_logits, atol=1e-5, rtol=1e-5)
    assert fused_flags(model) == flags
    assert hook_count(model) == hooks


def test_vit() -> None:
    model = tiny_vit()
    assert all(fused_flags(model).values())  # timm's default: the capture has to switch SDPA off
    blocks, attention = [(BATCH, 17, 32)] * 2, [(BATCH, 2, 17, 17)] * 2
    check_bundle(model, images(32), blocks, attention, embed=32)


def test_swin_blocks_flattened_and_windows_folded_into_heads() -> None:
    # 56 px / patch 4 = 14×14 tokens of width 24, then 7×7 of width 48; windows of 7×7: 4, then 1.
    blocks = [(BATCH, 196, 24)] * 2 + [(BATCH, 49, 48)] * 2
    attention = [(BATCH, 4 * 2, 49, 49)] * 2 + [(BATCH, 1 * 2, 49, 49)] * 2
    check_bundle(build_tiny("swin"), tiny_input("swin", batch=BATCH), blocks, attention, embed=48)


def test_distilled_deit_pre_logits_average_both_tokens() -> None:
    blocks, attention = [(BATCH, 18, 48)] * 2, [(BATCH, 2, 18, 18)] * 2
    check_bundle(build_tiny("deit_distilled"), tiny_input("deit_distilled", batch=BATCH), blocks, attention, 48)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_lrpq_quantized_modules(family: str) -> None:
    model = prepare(build_tiny(family), QuantConfig())
    x, hooks = tiny_input(family, batch=BATCH), hook_count(model)
    with torch.no_grad():
        float_features = extract_features(build_tiny(family), x)
        features = extract_features(model, x)
        reference = model(x)
    torch.testing.assert_close(features.logits, reference)
    assert [t.shape for t in features.tokens] == [t.shape for t in float_features.tokens]
    assert [a.shape for a in features.attention] == [a.shape for a in float_features.attention]
    for probabilities in features.attention:
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(probabilities.shape[:-1]))
    assert hook_count(model) == hooks


def test_no_grad_capture_of_a_quantized_model_keeps_the_probabilities() -> None:
    # Without autograd, QuantMatMul quantizes its attention input in place: the capture must hold a copy.
    model = quantize(build_tiny("vit"), QuantConfig(), tiny_input("vit", batch=4), progress=False)
    with torch.no_grad():
        features = extract_features(model, tiny_input("vit", batch=BATCH, seed=3))
    for probabilities in features.attention:
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(probabilities.shape[:-1]))


def test_student_features_keep_their_graph() -> None:
    teacher, student = tiny_vit(), copy.deepcopy(tiny_vit())
    with torch.no_grad():
        student.blocks[0].mlp.fc2.weight.add_(0.1)
    x = images(32)
    with torch.no_grad():
        target = extract_features(teacher, x)
    features = extract_features(student, x)
    assert all(a.requires_grad for a in features.attention) and features.embedding.requires_grad
    BlockMSE()(features, target).backward()
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_several_forwards_keep_the_latest_and_exceptions_still_clean_up() -> None:
    model = tiny_vit()
    with torch.no_grad(), capture_features(model) as capture:
        model(images(32))
        model(images(32)[:1])
        assert capture.features.logits.shape == (1, 10)
        assert len(capture.features.tokens) == 2
    with pytest.raises(RuntimeError, match="boom"), capture_features(model):
        raise RuntimeError("boom")
    assert hook_count(model) == 0
    assert all(fused_flags(model).values())


def test_without_attention_sdpa_stays_on() -> None:
    model = tiny_vit()
    with torch.no_grad(), capture_features(model, attention=False) as capture:
        assert all(fused_flags(model).values())
        model(images(32))
    assert capture.features.attention == []
    assert len(capture.features.tokens) == 2


def test_index_is_carried_and_missing_forward_is_an_error() -> None:
    model = tiny_vit()
    with torch.no_grad():
        features = extract_features(model, images(32), index=torch.tensor([3, 5]))
    assert features.index.tolist() == [3, 5]
    with capture_features(model) as capture, pytest.raises(DistillError, match="no forward"):
        _ = capture.features


def test_a_model_without_transformer_blocks_is_an_error() -> None:
    with pytest.raises(DistillError, match="blocks"), capture_features(nn.Linear(2, 2)):
        pass
