"""Layer scores over images on tiny timm models: coverage, block normalisation, early stop, files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from relevance_helpers import CONFIGS, VIT_LAYERS, tiny_images, tiny_model

from lrpq.relevance import (
    LayerScores,
    RelevanceError,
    collect_contributions,
    compute_layer_scores,
    ranking_stability,
)


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


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_layer_scores_cover_every_layer_are_nonnegative_and_deterministic(kind: str) -> None:
    images = tiny_images(kind)
    scores = compute_layer_scores(tiny_model(kind), images, progress=False)
    again = compute_layer_scores(tiny_model(kind), [images[:2], images[2]], progress=False)
    assert list(scores.scores) == _expected_names(kind)
    assert scores.num_images == 3
    assert all(math.isfinite(v) and v >= 0 for v in scores.scores.values())
    values = list(scores.scores.values())
    np.testing.assert_allclose(list(again.scores.values()), values, rtol=1e-5, atol=1e-12)
    assert scores.scores == compute_layer_scores(tiny_model(kind), images, progress=False).scores
    totals: dict[str, float] = {}
    for name, value in scores.relative().items():
        totals[scores.block_of[name]] = totals.get(scores.block_of[name], 0.0) + value
    assert set(totals) == set(scores.block_order)
    assert all(math.isclose(total, 1.0, rel_tol=1e-9) for total in totals.values())


def test_swin_patch_merging_is_weighed_against_the_block_it_feeds() -> None:
    """Alone in a block its relative importance would be 1.0 whatever its score."""
    scores = compute_layer_scores(tiny_model("swin"), tiny_images("swin", 2), progress=False)
    relative = scores.relative()
    fed = [name for name, block in scores.block_of.items() if block == "layers.1.blocks.0"]
    assert len(fed) == len(VIT_LAYERS) + 1
    assert 0.0 < relative["layers.1.downsample.reduction"] < 1.0
    assert math.isclose(sum(relative[name] for name in fed), 1.0, rel_tol=1e-9)


def test_early_stop_checks_the_running_ranking_every_few_images() -> None:
    model = tiny_model("vit")
    images = list(tiny_images("vit", 8))
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
    model = tiny_model("vit")
    scores = collect_contributions(model, tiny_images("vit", 2), progress=False).to_scores()
    scores.save(tmp_path / "scores.json")
    assert LayerScores.load(tmp_path / "scores.json") == scores
    scores.save_csv(tmp_path / "scores.csv")
    rows = (tmp_path / "scores.csv").read_text().splitlines()
    assert rows[0] == "layer,block,score,relative" and len(rows) == len(scores.scores) + 1
    (tmp_path / "bad.json").write_text(json.dumps({"scores": {"a": -1.0}, "block_of": {"a": "b"}}))
    with pytest.raises(RelevanceError):
        LayerScores.load(tmp_path / "bad.json")
