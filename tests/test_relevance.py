"""Relevance rules on hand-built graphs, hook hygiene, layer scores on tiny timm models, ref-A/B checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

import lrpq.relevance as lrpq_relevance
from lrpq.errors import LrpqError
from lrpq.relevance import (
    LayerScores,
    RelevanceError,
    add_relevance,
    clone_relevance,
    collect_contributions,
    compute_layer_scores,
    explain,
    layer_contribution,
    matmul_relevance,
    ranking_stability,
    relevance_map,
    relevance_trace,
    safe_divide,
    zplus_linear,
    zplus_relevance,
)
from lrpq.relevance_export import write_relevance_report

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared reference data not found at {SHARED}")

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2, num_classes=5)
CONFIGS = {
    "vit": ("vit_tiny_patch16_224", TINY_VIT),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", TINY_VIT),
    "dinov2_layerscale": ("vit_small_patch14_dinov2", {**TINY_VIT, "img_size": 28, "patch_size": 14}),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 2), num_classes=5),
    ),
}
VIT_LAYERS = ("attn.qkv", "attn.matmul1", "attn.matmul2", "attn.proj", "mlp.fc1", "mlp.fc2")


def _tiny(kind: str, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    name, kwargs = CONFIGS[kind]
    return timm.create_model(name, pretrained=False, **{**kwargs, **overrides}).eval()


def _images(kind: str, count: int = 3) -> torch.Tensor:
    size = CONFIGS[kind][1]["img_size"]
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


def _expected_names(kind: str) -> list[str]:
    if kind == "swin":
        blocks = [f"layers.{s}.blocks.{b}" for s in range(2) for b in range(2)]
        names = [f"{block}.{layer}" for block in blocks for layer in VIT_LAYERS]
        first_of_stage_1 = names.index("layers.1.blocks.0.attn.qkv")
        names.insert(first_of_stage_1, "layers.1.downsample.reduction")
        return ["patch_embed.proj", *names, "head.fc"]
    names = [f"blocks.{i}.{layer}" for i in range(2) for layer in VIT_LAYERS]
    heads = ["head", "head_dist"] if kind == "deit_distilled" else ["head"]
    return ["patch_embed.proj", *names, *heads]


def _sums(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


# --- rules on hand-built graphs -------------------------------------------------------------------


def test_zplus_linear_conserves_relevance_for_nonnegative_inputs_without_bias() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 7, generator=generator)
    weight = torch.randn(5, 7, generator=generator)
    r = torch.rand(4, 5, generator=generator)
    r_in = zplus_linear(x, weight, r)
    assert r_in.shape == x.shape
    assert (r_in >= 0).all()
    torch.testing.assert_close(_sums(r_in), _sums(r), rtol=1e-5, atol=1e-6)


def test_zplus_linear_equals_the_autograd_z_plus_rule() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 7, generator=generator)  # mixed signs: both x⁺w⁺ and x⁻w⁻ terms count
    weight = torch.randn(5, 7, generator=generator)
    r = torch.randn(2, 6, 5, generator=generator)
    torch.testing.assert_close(zplus_linear(x, weight, r), zplus_relevance(F.linear, x, weight, r))


def test_safe_divide_stabilises_away_from_zero_and_drops_exact_zeros() -> None:
    numerator = torch.tensor([1.0, 1.0, 1.0, 1.0])
    denominator = torch.tensor([2.0, -2.0, 0.0, -0.0])
    assert safe_divide(numerator, denominator, eps=1.0).tolist() == pytest.approx([1 / 3, -1 / 3, 0.0, 0.0])


def test_zplus_conv_conserves_relevance_for_mixed_sign_inputs() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    weight = torch.randn(4, 3, 2, 2, generator=generator)
    r = torch.rand(2, 4, 4, 4, generator=generator)
    r_in = zplus_relevance(lambda inp, w: F.conv2d(inp, w, stride=2), x, weight, r)
    torch.testing.assert_close(_sums(r_in), _sums(r), rtol=1e-5, atol=1e-6)


def test_matmul_split_conserves_relevance_between_the_two_operands() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 6, 4, generator=generator)
    b = torch.randn(3, 2, 4, 5, generator=generator)
    r = torch.rand(3, 2, 6, 5, generator=generator)
    r_a, r_b = matmul_relevance(a, b, r)
    assert r_a.shape == a.shape and r_b.shape == b.shape
    torch.testing.assert_close(_sums(r_a) + _sums(r_b), _sums(r), rtol=1e-4, atol=1e-5)
    # For a bilinear product gradient×input gives each operand the full relevance: an even split.
    torch.testing.assert_close(_sums(r_a), _sums(r) / 2, rtol=1e-4, atol=1e-5)


def test_residual_add_conserves_and_clone_sums() -> None:
    generator = torch.Generator().manual_seed(0)
    skip = torch.randn(2, 5, 3, generator=generator)
    branch = torch.randn(2, 5, 3, generator=generator)
    r = torch.rand(2, 5, 3, generator=generator)
    r_skip, r_branch = add_relevance(skip, branch, r)
    torch.testing.assert_close(_sums(r_skip) + _sums(r_branch), _sums(r), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(clone_relevance(r_skip, r_branch), r_skip + r_branch)
    assert torch.equal(clone_relevance(r_skip, r_branch), torch.stack([r_skip, r_branch]).sum(0))


def test_zplus_equals_gradient_times_input_on_a_positive_linear_chain() -> None:
    """With x ≥ 0 and w ≥ 0 every term x·w is positive, so z⁺ is the plain z-rule (LRP-0); on a
    bias-free linear chain seeded with the target logit itself, LRP-0 is exactly gradient × input."""
    generator = torch.Generator().manual_seed(0)
    w1, w2 = torch.rand(6, 8, generator=generator), torch.rand(3, 6, generator=generator)
    x = torch.rand(2, 8, generator=generator).requires_grad_()
    logits = F.linear(F.linear(x, w1), w2)
    (grad,) = torch.autograd.grad(logits[:, 1].sum(), x)
    seed = torch.zeros_like(logits)
    seed[:, 1] = logits[:, 1].detach()
    r_hidden = zplus_linear(F.linear(x, w1).detach(), w2, seed)
    r_input = zplus_linear(x.detach(), w1, r_hidden)
    torch.testing.assert_close(r_input, x.detach() * grad, rtol=1e-5, atol=1e-6)


def _assert_clean(model: torch.nn.Module, fused: dict[torch.nn.Module, bool], training: bool) -> None:
    for module in model.modules():
        assert not module._forward_hooks
        assert module.training is training
    assert {module: module.fused_attn for module in fused} == fused


def test_hooks_and_modes_are_restored_after_the_context_and_after_an_exception() -> None:
    model = _tiny("vit").train()
    fused = {m: True for m in model.modules() if hasattr(m, "fused_attn")}
    for module in fused:
        module.fused_attn = True
    with relevance_trace(model) as trace:
        assert all(not m.fused_attn for m in fused) and not model.training
        model(_images("vit", 1))
        assert trace.outputs[model.head].shape == (1, 5)
    _assert_clean(model, fused, training=True)
    with pytest.raises(ZeroDivisionError), relevance_trace(model):
        model(_images("vit", 1))
        _ = 1 / 0
    _assert_clean(model, fused, training=True)
    explain(model, _images("vit", 2))
    _assert_clean(model, fused, training=True)
    assert all(p.grad is None for p in model.parameters())


def test_layer_contribution_is_the_positive_part_of_gradient_times_relevance() -> None:
    # grad (-2, 3, -1, 4) ⊙ R (-0.5, -1, 2, 0.25) = (1, -3, -2, 1): the negative·negative product counts,
    # so (∇A ⊙ R)⁺ = (1, 0, 0, 1) and its mean is 0.5 (clamping R first would give 0.25).
    grad = torch.tensor([[-2.0, 3.0], [-1.0, 4.0]]).reshape(1, 2, 2)
    relevance = torch.tensor([[-0.5, -1.0], [2.0, 0.25]]).reshape(1, 2, 2)
    assert layer_contribution(grad, relevance, 1).tolist() == [0.5]
    assert layer_contribution(torch.cat([grad, -grad]), torch.cat([relevance, relevance]), 2).tolist() == [0.5, 1.25]


# --- layer scores on tiny models ------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_layer_scores_cover_every_layer_are_nonnegative_and_deterministic(kind: str) -> None:
    images = _images(kind)
    scores = compute_layer_scores(_tiny(kind), images, progress=False)
    again = compute_layer_scores(_tiny(kind), [images[:2], images[2]], progress=False)
    assert list(scores.scores) == _expected_names(kind)
    assert scores.num_images == 3
    assert all(math.isfinite(v) and v >= 0 for v in scores.scores.values())
    values = list(scores.scores.values())
    np.testing.assert_allclose(list(again.scores.values()), values, rtol=1e-5, atol=1e-12)
    assert scores.scores == compute_layer_scores(_tiny(kind), images, progress=False).scores
    totals: dict[str, float] = {}
    for name, value in scores.relative().items():
        totals[scores.block_of[name]] = totals.get(scores.block_of[name], 0.0) + value
    assert set(totals) == set(scores.block_order)
    assert all(math.isclose(total, 1.0, rel_tol=1e-9) for total in totals.values())


def test_scores_are_the_mean_positive_part_over_the_propagated_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each score is mean((∇A ⊙ R)⁺) of the tensor the rules scored, negative·negative elements included."""
    scored: dict[str, tuple[Tensor, Tensor]] = {}
    original_finish = lrpq_relevance._Propagation.finish

    def finish(self, target_logit: Tensor, batch: int):  # the gradient at each scored tensor, by autograd
        grads = torch.autograd.grad(target_logit, [p.activation for p in self.points], retain_graph=True)
        scored.update({point.name: (grad, point.relevance) for point, grad in zip(self.points, grads, strict=True)})
        return original_finish(self, target_logit, batch)

    monkeypatch.setattr(lrpq_relevance._Propagation, "finish", finish)
    explanation = explain(_tiny("vit"), _images("vit", 1))
    both_negative = 0
    for name, (grad, r) in scored.items():
        products = [float(g) * float(v) for g, v in zip(grad.flatten(), r.flatten(), strict=True)]
        by_hand = sum(max(p, 0.0) for p in products) / len(products)
        assert explanation.contributions[name].item() == pytest.approx(by_hand, rel=1e-4, abs=1e-12), name
        both_negative += int(((grad < 0) & (r < 0)).sum())
    assert len(scored) == len(explanation.contributions)
    assert both_negative > 0  # the case a score clamping R first would drop does occur


def test_q_k_product_is_scored_on_chefers_post_softmax_attention_map() -> None:
    explanation = explain(_tiny("vit"), _images("vit", 2))
    for block in ("blocks.0", "blocks.1"):
        cam = explanation.attention[f"{block}.attn"]  # E_h[(∇A ⊙ R_A)⁺], (B, N, N)
        torch.testing.assert_close(explanation.contributions[f"{block}.attn.matmul1"], cam.mean((1, 2)))


def test_block_names_follow_the_timm_module_tree() -> None:
    vit = explain(_tiny("deit_distilled"), _images("deit_distilled", 1)).block_of
    swin = explain(_tiny("swin"), _images("swin", 1)).block_of
    assert vit["patch_embed.proj"] == "patch_embed"
    assert vit["blocks.1.attn.matmul1"] == "blocks.1"
    assert vit["head"] == vit["head_dist"] == "head"
    assert swin["layers.1.downsample.reduction"] == "layers.1.blocks.0"  # the block it feeds
    assert swin["layers.0.blocks.1.mlp.fc2"] == "layers.0.blocks.1"
    assert swin["head.fc"] == "head"


def test_swin_patch_merging_is_weighed_against_the_block_it_feeds() -> None:
    """Alone in a block its relative importance would be 1.0 whatever its score."""
    scores = compute_layer_scores(_tiny("swin"), _images("swin", 2), progress=False)
    relative = scores.relative()
    fed = [name for name, block in scores.block_of.items() if block == "layers.1.blocks.0"]
    assert len(fed) == len(VIT_LAYERS) + 1
    assert 0.0 < relative["layers.1.downsample.reduction"] < 1.0
    assert math.isclose(sum(relative[name] for name in fed), 1.0, rel_tol=1e-9)


def test_swin_relevance_is_conserved_from_logits_to_pixels() -> None:
    """Swin has no class token or position embedding to absorb relevance, so every rule on the way
    (z⁺, window moves, attention splits, residual splits, patch merging) must conserve it."""
    explanation = explain(_tiny("swin"), _images("swin", 2))
    torch.testing.assert_close(_sums(explanation.input_relevance), torch.ones(2), rtol=1e-3, atol=1e-3)


def test_vit_with_average_pooling_conserves_relevance_from_logits_to_pixels() -> None:
    model = _tiny("vit", class_token=False, global_pool="avg", pos_embed="none")
    explanation = explain(model, _images("vit", 2))
    torch.testing.assert_close(_sums(explanation.input_relevance), torch.ones(2), rtol=1e-3, atol=1e-3)


def test_target_selects_the_class_and_is_checked() -> None:
    model = _tiny("vit")
    assert explain(model, _images("vit", 2), target=3).target.tolist() == [3, 3]
    with pytest.raises(RelevanceError, match="class index"):
        explain(model, _images("vit", 1), target=7)


def test_unsupported_models_raise_a_relevance_error_naming_the_module_type() -> None:
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=5)
    with pytest.raises(RelevanceError, match="ResNet"):
        compute_layer_scores(resnet, torch.zeros(1, 3, 32, 32), progress=False)
    diff = _tiny("vit", attn_layer="diff")
    with pytest.raises(RelevanceError, match="DiffAttention") as error:
        explain(diff, _images("vit", 1))
    assert isinstance(error.value, LrpqError) and "\n" not in str(error.value)
    assert all(not module._forward_hooks for module in diff.modules())


def test_early_stop_checks_the_running_ranking_every_few_images() -> None:
    model = _tiny("vit")
    images = list(_images("vit", 8))
    assert compute_layer_scores(model, images, progress=False, stop_tau=-1.0, check_every=2).num_images == 4
    assert compute_layer_scores(model, images, progress=False, stop_tau=1.01, check_every=2).num_images == 8


def test_ranking_stability_compares_prefix_rankings_with_the_full_ranking() -> None:
    per_image = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    result = ranking_stability(per_image, [1, 3])
    assert result[0] == (1, pytest.approx(-1.0))
    assert result[1] == (3, pytest.approx(1.0))
    with pytest.raises(RelevanceError, match="outside"):
        ranking_stability(per_image, [4])


def test_layer_scores_round_trip_through_json_and_csv(tmp_path: Path) -> None:
    model = _tiny("vit")
    scores = collect_contributions(model, _images("vit", 2), progress=False).to_scores()
    scores.save(tmp_path / "scores.json")
    assert LayerScores.load(tmp_path / "scores.json") == scores
    scores.save_csv(tmp_path / "scores.csv")
    rows = (tmp_path / "scores.csv").read_text().splitlines()
    assert rows[0] == "layer,block,score,relative" and len(rows) == len(scores.scores) + 1
    (tmp_path / "bad.json").write_text(json.dumps({"scores": {"a": -1.0}, "block_of": {"a": "b"}}))
    with pytest.raises(RelevanceError):
        LayerScores.load(tmp_path / "bad.json")


def test_relevance_map_is_a_normalised_pixel_map() -> None:
    model = _tiny("vit")
    image = _images("vit", 1)[0]
    for method in ("lrp", "attribution"):
        heat = relevance_map(model, image, method=method)
        assert heat.shape == (32, 32)
        assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    with pytest.raises(RelevanceError, match="attribution"):
        relevance_map(_tiny("swin"), _images("swin", 1)[0], method="attribution")


# --- reference models -----------------------------------------------------------------------------


def _load_card(name: str) -> tuple[torch.nn.Module, object, dict]:
    card = json.loads((SHARED / "models" / name).read_text())
    model = timm.create_model(card["timm_name"], pretrained=False, **card["kwargs"])
    state = safetensors.torch.load_file(SHARED / "models" / card["checkpoint"])
    model.load_state_dict({key: value.float() for key, value in state.items()})
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    transform = timm.data.create_transform(**{k: card["data_config"][k] for k in keys}, is_training=False)
    return model.eval(), transform, card


def _central_share(heat: torch.Tensor) -> float:
    """Share of the map inside the central box of half the height and width (a quarter of the area)."""
    h, w = heat.shape
    return float(heat[h // 4 : h - h // 4, w // 4 : w - w // 4].sum() / heat.sum())


@needs_shared
@pytest.mark.shared
def test_ref_a_lrp_pixel_relevance_concentrates_on_the_centred_cifar_object() -> None:
    """CIFAR-10 objects are centred; a uniform map puts 25 % of its mass in the central box."""
    model, transform, card = _load_card("vit_cifar10.json")
    folders = [SHARED / "data/cifar10/dev" / name for name in card["classes"]]
    files = [sorted(folder.iterdir())[i] for folder in folders for i in range(3)]
    batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    heat = explain(model, batch).input_relevance.sum(1).clamp(min=0)
    shares = [_central_share(h) for h in heat]
    assert np.mean(shares) > 0.33


def _logit_after_deleting(model: nn.Module, image: Tensor, patches: Tensor, target: int) -> float:
    """Target logit with the given 14-px patches of ref-B's 16×16 grid set to the mean colour."""
    keep = torch.ones(16 * 16)
    keep[patches] = 0
    mask = keep.reshape(16, 16).repeat_interleave(14, 0).repeat_interleave(14, 1)
    with torch.no_grad():
        return float(model((image * mask)[None])[0, target])


@needs_shared
@pytest.mark.shared
def test_ref_b_attribution_map_is_on_the_object_and_report_is_written(tmp_path: Path) -> None:
    """Golf ball and church fill the centre of their photos; deleting the quarter of the patches the
    map ranks highest must also cost the class far more logit than deleting the lowest-ranked quarter."""
    model, transform, card = _load_card("vits14_imagenette.json")
    picks = {"n03445777": 1, "n03028079": 1}  # golf ball, church
    for synset, index in picks.items():
        file = sorted((SHARED / "data/imagenette/dev" / synset).iterdir())[index]
        image = transform(Image.open(file).convert("RGB"))
        target = card["classes"].index(synset)
        heat = relevance_map(model, image, target=target, method="attribution")
        assert _central_share(heat) > 0.35
        ranking = F.avg_pool2d(heat[None, None], 14).flatten().argsort(descending=True)
        top, bottom = (
            _logit_after_deleting(model, image, patches, target) for patches in (ranking[:64], ranking[-64:])
        )
        assert bottom - top > 2.0
    scores = compute_layer_scores(model, image, progress=False)
    assert len(scores.scores) == 1 + 12 * 6 + 1
    assert all(math.isfinite(v) and v >= 0 for v in scores.scores.values())
    assert sum(scores.scores.values()) > 0
    mean, std = (torch.tensor(card["data_config"][key])[:, None, None] for key in ("mean", "std"))
    out = write_relevance_report(scores, tmp_path / "report", heatmaps=[(image * std + mean, heat, "church")])
    expected = {"scores.json", "scores.csv", "importance.png", "heatmap_0.png"}
    assert {p.name for p in out.iterdir()} == expected
