"""explain and relevance_map: targets, block names, pixel maps; on ref-A and ref-B, maps on the object."""

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
from conftest import SHARED
from PIL import Image
from relevance_helpers import tiny_images, tiny_model
from torch import Tensor, nn

from lrpq.relevance import (
    RelevanceError,
    compute_layer_scores,
    explain,
    relevance_map,
)
from lrpq.relevance.report import write_relevance_report

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared reference data not found at {SHARED}")


def test_block_names_follow_the_timm_module_tree() -> None:
    vit = explain(tiny_model("deit_distilled"), tiny_images("deit_distilled", 1)).block_of
    swin = explain(tiny_model("swin"), tiny_images("swin", 1)).block_of
    assert vit["patch_embed.proj"] == "patch_embed"
    assert vit["blocks.1.attn.matmul1"] == "blocks.1"
    assert vit["head"] == vit["head_dist"] == "head"
    assert swin["layers.1.downsample.reduction"] == "layers.1.blocks.0"  # the block it feeds
    assert swin["layers.0.blocks.1.mlp.fc2"] == "layers.0.blocks.1"
    assert swin["head.fc"] == "head"


def test_target_selects_the_class_and_is_checked() -> None:
    model = tiny_model("vit")
    assert explain(model, tiny_images("vit", 2), target=3).target.tolist() == [3, 3]
    with pytest.raises(RelevanceError, match="class index"):
        explain(model, tiny_images("vit", 1), target=7)


def test_relevance_map_is_a_normalised_pixel_map() -> None:
    model = tiny_model("vit")
    image = tiny_images("vit", 1)[0]
    for method in ("lrp", "attribution"):
        heat = relevance_map(model, image, method=method)
        assert heat.shape == (32, 32)
        assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    with pytest.raises(RelevanceError, match="attribution"):
        relevance_map(tiny_model("swin"), tiny_images("swin", 1)[0], method="attribution")


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
