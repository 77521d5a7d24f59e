"""Relevance report files: contents, figures, and all-or-nothing writing."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lrpq.config import BitPlan, LayerBits
from lrpq.outputs import OutputError
from lrpq.relevance import LayerScores, RelevanceError
from lrpq.relevance.report import plot_importance, save_heatmap, save_heatmap_grid, write_relevance_report


def _scores() -> LayerScores:
    layers = [f"blocks.{i}.{layer}" for i in range(2) for layer in ("attn.qkv", "mlp.fc2")]
    names = ["patch_embed.proj", *layers, "head"]
    values = [0.5, 0.3, 0.1, 0.0, 0.0, 0.2]
    block_of = {name: name.rsplit(".", 2)[0] for name in layers}
    block_of |= {"patch_embed.proj": "patch_embed", "head": "head"}
    return LayerScores(
        dict(zip(names, values, strict=True)), block_of, ["patch_embed", "blocks.0", "blocks.1", "head"], 7
    )


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_report_holds_scores_chart_and_heatmaps(tmp_path: Path) -> None:
    scores = _scores()
    plan = BitPlan({"blocks.0.attn.qkv": LayerBits(4, 6), "blocks.0.mlp.fc2": LayerBits(3, 5)})
    image = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0))
    heat = torch.linspace(0, 1, 40 * 40).reshape(40, 40)
    pil = Image.fromarray((np.random.default_rng(0).random((20, 30, 3)) * 255).astype("uint8"))
    heatmaps = [(image, heat, "a"), (pil, heat, "b")]
    out = write_relevance_report(scores, tmp_path / "run" / "report", plan, heatmaps)

    assert out == tmp_path / "run" / "report"
    files = {"scores.json", "scores.csv", "importance.png", "heatmap_0.png", "heatmap_1.png"}
    assert {p.name for p in out.iterdir()} == files
    assert [p.name for p in out.parent.iterdir()] == ["report"]  # staging directory is gone
    assert LayerScores.load(out / "scores.json") == scores
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["layer"] for row in rows] == list(scores.scores)
    by_layer = {row["layer"]: row for row in rows}
    assert float(by_layer["blocks.0.attn.qkv"]["relative"]) == pytest.approx(0.75)
    assert float(by_layer["blocks.1.mlp.fc2"]["relative"]) == pytest.approx(0.5)  # all-zero block: shared
    assert by_layer["head"]["block"] == "head"
    width, height = _png_size(out / "importance.png")
    assert width > height > 100
    assert _png_size(out / "heatmap_0.png")[0] > _png_size(out / "heatmap_0.png")[1]


def test_failure_leaves_no_report_and_no_staging_directory(tmp_path: Path) -> None:
    bad_heat = torch.zeros(2, 3, 4)
    with pytest.raises(RelevanceError, match="heat map"):
        write_relevance_report(_scores(), tmp_path / "report", heatmaps=[(torch.rand(3, 8, 8), bad_heat, "")])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C half way: nothing either
        write_relevance_report(_scores(), tmp_path / "report", heatmaps=_interrupted())
    assert list(tmp_path.iterdir()) == []


def _interrupted() -> Iterator[tuple[torch.Tensor, np.ndarray, str]]:
    yield torch.rand(3, 8, 8), np.ones((8, 8)), "first"
    raise KeyboardInterrupt


def test_existing_report_is_not_overwritten_but_an_empty_directory_is_used(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        write_relevance_report(_scores(), tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert (write_relevance_report(_scores(), tmp_path / "empty") / "importance.png").is_file()


def test_heatmap_panels_and_input_checks(tmp_path: Path) -> None:
    image = torch.rand(1, 16, 16)
    save_heatmap(image, {"one": np.ones((4, 4)), "two": np.zeros((16, 16))}, tmp_path / "h.png", "t")
    width, height = _png_size(tmp_path / "h.png")
    assert width > 2.5 * height
    with pytest.raises(RelevanceError, match="image"):
        save_heatmap(torch.rand(16, 16), {"m": np.ones((4, 4))}, tmp_path / "bad.png")
    plot_importance(_scores(), tmp_path / "no_plan.png")
    assert _png_size(tmp_path / "no_plan.png")[0] > 100


def test_heatmap_grid_wraps_into_rows_and_checks_its_input(tmp_path: Path) -> None:
    overlays = [(torch.rand(3, 16, 16), np.eye(16), f"image {i}") for i in range(7)]
    save_heatmap_grid(overlays, tmp_path / "wide.png", "seven in one row", columns=7)
    save_heatmap_grid(overlays, tmp_path / "tall.png", "seven in rows of two", columns=2)
    wide, tall = _png_size(tmp_path / "wide.png"), _png_size(tmp_path / "tall.png")
    assert wide[0] > 4 * wide[1]  # one row of seven
    assert tall[1] > 2 * tall[0]  # four rows of two
    with pytest.raises(RelevanceError, match="at least one image"):
        save_heatmap_grid([], tmp_path / "none.png")
    with pytest.raises(RelevanceError, match=r"heat map must be \(H, W\)"):
        save_heatmap_grid([(torch.rand(3, 16, 16), np.ones(16), "flat")], tmp_path / "flat.png")
