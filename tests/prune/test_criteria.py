"""Unit scores of every criterion on hand-made weights, activations and contribution Grams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny, tiny_input
from timm.layers import LayerScale

from lrpq.prune.criteria import CriterionError, UnitScores, l1_scores, score_units, slimming_scores
from lrpq.prune.lrp_scores import LRP_SCORES
from lrpq.prune.reconstruction import contribution_grams, regression_scores, thinet_scores
from lrpq.prune.selection import best
from lrpq.prune.structure import branch_scale, head_channels, head_dim, prunable_blocks
from lrpq.relevance import compute_layer_scores


def gram_of(contributions: list[np.ndarray]) -> torch.Tensor:
    """M[u, v] = ⟨Z_u, Z_v⟩ of explicit contributions."""
    flat = np.stack([z.reshape(-1) for z in contributions])
    return torch.from_numpy(flat @ flat.T)


def test_l1_ranks_the_head_with_the_largest_qkv_rows_and_the_largest_fc1_row_first() -> None:
    block = build_tiny("vit").blocks[0]
    attn = block.attn
    third = attn.qkv.out_features // 3
    with torch.no_grad():
        attn.qkv.weight.fill_(0.1)
        attn.qkv.weight[head_channels([0], head_dim(attn)) + 2 * third] = 0.4  # head 0: large v rows
        attn.qkv.weight[head_channels([1], head_dim(attn))] = 0.3  # head 1: large q rows, a smaller sum
        block.mlp.fc1.weight.fill_(0.1)
        block.mlp.fc1.weight[7] = -0.5  # the sign does not matter
    scores = l1_scores(block)
    assert best(scores["heads"], 1) == [0]
    assert scores["heads"][0] / scores["heads"][1] == pytest.approx((0.1 + 0.1 + 0.4) / (0.3 + 0.1 + 0.1))
    assert best(scores["hidden"], 1) == [7]


def test_slimming_reads_layer_scale_and_the_consumer_columns() -> None:
    block = build_tiny("dinov2").blocks[0]
    attn, mlp = block.attn, block.mlp
    assert isinstance(block.ls1, LayerScale)
    with torch.no_grad():
        attn.proj.weight.fill_(1.0)
        block.ls1.gamma.fill_(1.0)
        attn.proj.weight[:, head_channels([0], head_dim(attn))] = 2.0  # head 0's columns twice as large
        mlp.fc1.weight.fill_(1.0)
        mlp.fc2.weight.fill_(1.0)
        mlp.fc1.weight[3] = 2.0
        mlp.fc2.weight[:, 3] = 3.0  # channel 3: 2 × 3 the product of the others
        block.ls2.gamma.fill_(0.5)
    scores = slimming_scores(block)
    assert best(scores["heads"], 1) == [0]
    assert scores["heads"][0] == pytest.approx(2 * scores["heads"][1])
    assert scores["hidden"][3] == pytest.approx(6 * scores["hidden"][0])
    with torch.no_grad():
        block.ls1.gamma.fill_(3.0)  # γ scales every head alike
    assert slimming_scores(block)["heads"] == pytest.approx(3 * scores["heads"])
    assert torch.equal(branch_scale(build_tiny("vit").blocks[0], "mlp"), torch.ones(48))  # no LayerScale: 1


def test_thinet_removes_the_smallest_contribution_first_and_sees_cancellation() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    b *= np.sqrt(1.5 * (a**2).sum() / (b**2).sum())  # ‖b‖² = 1.5 ‖a‖²
    small = 0.1 * rng.normal(size=(20, 4))
    assert best(thinet_scores(gram_of([a, small, b])), 2) == [0, 2]  # the small one goes first
    # a and −a cancel: removing both leaves the output unchanged, so they go before b
    scores = thinet_scores(gram_of([a, -a, b]))
    assert best(scores, 1) == [2]
    assert scores[0] < scores[1] < scores[2]
    assert scores[1] == pytest.approx(np.nextafter(scores[0], 1.0))  # after both, the error is back to 0


def test_regression_keeps_the_unit_the_others_cannot_replace() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    b *= np.sqrt(0.5 * (a**2).sum() / (b**2).sum())  # b is the smallest contribution …
    scores = regression_scores(gram_of([a, -a, b]))  # … but a and −a add up to nothing
    assert best(scores, 1) == [2]
    # independent contributions: the LASSO drops the weakest first, like magnitude would
    c = rng.normal(size=(20, 4))
    scores = regression_scores(gram_of([a, 0.2 * c, b]))
    assert list(np.argsort(scores)) == [1, 2, 0]


def test_units_without_output_score_lowest_everywhere() -> None:
    """A channel whose fc2 column is zero changes nothing: reconstruction criteria and lrp rank it last."""
    model = build_tiny("vit")
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[:, 5] = 0
        model.blocks[1].attn.proj.weight[:, head_channels([0], head_dim(model.blocks[1].attn))] = 0
    images = tiny_input("vit", batch=4)
    for criterion in ("thinet", "regression"):
        scores = score_units(model, criterion, images, progress=False).blocks["blocks.1"]
        assert int(np.argmin(scores["hidden"])) == 5, criterion
        assert int(np.argmin(scores["heads"])) == 0, criterion


@pytest.mark.parametrize("lrp_score", LRP_SCORES)
def test_lrp_gives_no_relevance_to_units_whose_consumer_columns_are_zero(lrp_score: str) -> None:
    model = build_tiny("vit")
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[:, head_channels([1], head_dim(model.blocks[0].attn))] = 0
        model.blocks[1].mlp.fc2.weight[:, [3, 9]] = 0
    scores = score_units(model, "lrp", tiny_input("vit", batch=3), lrp_score=lrp_score, progress=False)
    assert scores.blocks["blocks.0"]["heads"][1] == 0.0
    assert scores.blocks["blocks.0"]["heads"][0] != 0.0
    hidden = scores.blocks["blocks.1"]["hidden"]
    assert hidden[3] == hidden[9] == 0.0
    assert np.count_nonzero(hidden) > len(hidden) // 2
    assert scores.details == {"images": 3, "lrp_score": lrp_score}


def test_lrp_head_scores_split_the_layer_score_of_lrpq_relevance() -> None:
    """Summed over heads, relevance × gradient is LRP-QViT's matmul2 contribution (a mean over its elements)."""
    model = build_tiny("vit")
    images = tiny_input("vit", batch=3)
    heads = score_units(model, "lrp", images, lrp_score="relevance-gradient", progress=False).blocks
    layers = compute_layer_scores(model, images, progress=False).scores
    elements = 17 * model.blocks[0].attn.attn_dim  # tokens × merged head channels
    for i in range(2):
        assert heads[f"blocks.{i}"]["heads"].sum() == pytest.approx(layers[f"blocks.{i}.attn.matmul2"] * elements)


def test_lrp_scores_cover_swin_and_agree_across_batch_sizes() -> None:
    model = build_tiny("swin")
    images = tiny_input("swin", batch=4)
    whole = score_units(model, "lrp", images, batch_size=4, progress=False)
    split = score_units(model, "lrp", images, batch_size=1, progress=False)
    assert set(whole.blocks) == set(prunable_blocks(model))
    for name, block in prunable_blocks(model).items():
        assert whole.blocks[name]["heads"].shape == (block.attn.num_heads,)
        np.testing.assert_allclose(whole.blocks[name]["hidden"], split.blocks[name]["hidden"], rtol=1e-4, atol=1e-9)


def test_contribution_gram_equals_the_explicit_inner_products() -> None:
    model = build_tiny("dinov2")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LayerScale):
                module.gamma.uniform_(0.5, 2.0)
    images = tiny_input("dinov2", batch=2)
    block = model.blocks[1]
    seen = {}
    handles = [
        block.attn.proj.register_forward_pre_hook(lambda _m, args: seen.__setitem__("heads", args[0])),
        block.mlp.fc2.register_forward_pre_hook(lambda _m, args: seen.__setitem__("hidden", args[0])),
    ]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    grams = contribution_grams(model, images, batch_size=1, progress=False)["blocks.1"]
    for kind, consumer, branch, width in (
        ("heads", block.attn.proj, "attn", head_dim(block.attn)),
        ("hidden", block.mlp.fc2, "mlp", 1),
    ):
        x = seen[kind].reshape(-1, consumer.in_features).double()
        weight = consumer.weight.double() * branch_scale(block, branch).double().unsqueeze(1)
        units = consumer.in_features // width
        z = [x[:, u * width : (u + 1) * width] @ weight[:, u * width : (u + 1) * width].T for u in range(units)]
        expected = torch.stack([torch.stack([(zu * zv).sum() for zv in z]) for zu in z])
        torch.testing.assert_close(grams[kind], expected, rtol=1e-6, atol=1e-9)


def test_random_scores_follow_the_seed() -> None:
    model = build_tiny("vit")
    first, again, other = (score_units(model, "random", seed=s).blocks for s in (0, 0, 1))
    assert all(np.array_equal(first[n]["hidden"], again[n]["hidden"]) for n in first)
    assert not np.array_equal(first["blocks.0"]["hidden"], other["blocks.0"]["hidden"])


def test_unknown_criteria_and_missing_images_are_refused() -> None:
    model = build_tiny("vit")
    with pytest.raises(CriterionError, match="unknown"):
        score_units(model, "taylor")
    for criterion in ("lrp", "thinet", "regression"):
        with pytest.raises(CriterionError, match="calibration images"):
            score_units(model, criterion)


def test_unit_scores_round_trip(tmp_path) -> None:
    scores = score_units(build_tiny("vit"), "l1")
    scores.save(tmp_path / "scores.json")
    loaded = UnitScores.load(tmp_path / "scores.json")
    assert loaded.criterion == "l1"
    for name, block in scores.blocks.items():
        for kind, values in block.items():
            assert np.array_equal(loaded.blocks[name][kind], values)
    (tmp_path / "bad.json").write_text('{"blocks": {}}')
    with pytest.raises(CriterionError, match="unit-score"):
        UnitScores.load(tmp_path / "bad.json")
