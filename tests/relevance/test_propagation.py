"""The backward pass on tiny timm models: hook hygiene, what is scored, conservation to the pixels, errors."""

from __future__ import annotations

import pytest
import timm
import torch
from relevance_helpers import per_image_sums, tiny_images, tiny_model
from torch import Tensor

from lrpq.errors import LrpqError
from lrpq.relevance import (
    Propagation,
    RelevanceError,
    compute_layer_scores,
    explain,
    relevance_trace,
)


def _assert_clean(model: torch.nn.Module, fused: dict[torch.nn.Module, bool], training: bool) -> None:
    for module in model.modules():
        assert not module._forward_hooks
        assert module.training is training
    assert {module: module.fused_attn for module in fused} == fused


def test_hooks_and_modes_are_restored_after_the_context_and_after_an_exception() -> None:
    model = tiny_model("vit").train()
    fused = {m: True for m in model.modules() if hasattr(m, "fused_attn")}
    for module in fused:
        module.fused_attn = True
    with relevance_trace(model) as trace:
        assert all(not m.fused_attn for m in fused) and not model.training
        model(tiny_images("vit", 1))
        assert trace.outputs[model.head].shape == (1, 5)
    _assert_clean(model, fused, training=True)
    with pytest.raises(ZeroDivisionError), relevance_trace(model):
        model(tiny_images("vit", 1))
        _ = 1 / 0
    _assert_clean(model, fused, training=True)
    explain(model, tiny_images("vit", 2))
    _assert_clean(model, fused, training=True)
    assert all(p.grad is None for p in model.parameters())


def test_scores_are_the_mean_positive_part_over_the_propagated_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each score is mean((∇A ⊙ R)⁺) of the tensor the rules scored, negative·negative elements included."""
    scored: dict[str, tuple[Tensor, Tensor]] = {}
    original_finish = Propagation.finish

    def finish(self, target_logit: Tensor, batch: int):  # the gradient at each scored tensor, by autograd
        grads = torch.autograd.grad(target_logit, [p.activation for p in self.points], retain_graph=True)
        scored.update({point.name: (grad, point.relevance) for point, grad in zip(self.points, grads, strict=True)})
        return original_finish(self, target_logit, batch)

    monkeypatch.setattr(Propagation, "finish", finish)
    explanation = explain(tiny_model("vit"), tiny_images("vit", 1))
    both_negative = 0
    for name, (grad, r) in scored.items():
        products = [float(g) * float(v) for g, v in zip(grad.flatten(), r.flatten(), strict=True)]
        by_hand = sum(max(p, 0.0) for p in products) / len(products)
        assert explanation.contributions[name].item() == pytest.approx(by_hand, rel=1e-4, abs=1e-12), name
        both_negative += int(((grad < 0) & (r < 0)).sum())
    assert len(scored) == len(explanation.contributions)
    assert both_negative > 0  # the case a score clamping R first would drop does occur


def test_q_k_product_is_scored_on_chefers_post_softmax_attention_map() -> None:
    explanation = explain(tiny_model("vit"), tiny_images("vit", 2))
    for block in ("blocks.0", "blocks.1"):
        cam = explanation.attention[f"{block}.attn"]  # E_h[(∇A ⊙ R_A)⁺], (B, N, N)
        torch.testing.assert_close(explanation.contributions[f"{block}.attn.matmul1"], cam.mean((1, 2)))


def test_swin_relevance_is_conserved_from_logits_to_pixels() -> None:
    """Swin has no class token or position embedding to absorb relevance, so every rule on the way
    (z⁺, window moves, attention splits, residual splits, patch merging) must conserve it."""
    explanation = explain(tiny_model("swin"), tiny_images("swin", 2))
    torch.testing.assert_close(per_image_sums(explanation.input_relevance), torch.ones(2), rtol=1e-3, atol=1e-3)


def test_vit_with_average_pooling_conserves_relevance_from_logits_to_pixels() -> None:
    model = tiny_model("vit", class_token=False, global_pool="avg", pos_embed="none")
    explanation = explain(model, tiny_images("vit", 2))
    torch.testing.assert_close(per_image_sums(explanation.input_relevance), torch.ones(2), rtol=1e-3, atol=1e-3)


def test_unsupported_models_raise_a_relevance_error_naming_the_module_type() -> None:
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=5)
    with pytest.raises(RelevanceError, match="ResNet"):
        compute_layer_scores(resnet, torch.zeros(1, 3, 32, 32), progress=False)
    diff = tiny_model("vit", attn_layer="diff")
    with pytest.raises(RelevanceError, match="DiffAttention") as error:
        explain(diff, tiny_images("vit", 1))
    assert isinstance(error.value, LrpqError) and "\n" not in str(error.value)
    assert all(not module._forward_hooks for module in diff.modules())
