"""Noise breakdown: isolating groups of quantization points, restoring modes, covering every point once."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import build_tiny, tiny_input

from lrpq.api import quantize, quantizers, set_mode
from lrpq.config import BitPlan, LayerBits, QuantConfig
from lrpq.errors import LrpqError
from lrpq.noise_breakdown import groups_by_kind, groups_by_layer, noise_breakdown, only_quantizing, snr_db
from lrpq.quantizers import QuantMode


def quantized_tiny(family: str = "vit", config: QuantConfig | None = None) -> torch.nn.Module:
    return quantize(build_tiny(family), config or QuantConfig(6, 6), tiny_input(family, 8), progress=False)


def test_snr_db_by_hand_and_for_equal_tensors() -> None:
    assert snr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5])) == pytest.approx(20.0)  # 5 / 0.5 = 10
    assert snr_db(torch.tensor([1.0]), torch.tensor([0.0])) == pytest.approx(0.0)
    assert snr_db(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == math.inf


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_groups_cover_every_point_exactly_once(family: str) -> None:
    model = quantized_tiny(family)
    every = sorted(quantizers(model))
    for groups in (groups_by_layer(model), groups_by_kind(model)):
        covered = sorted(name for points in groups.values() for name in points)
        assert covered == every
    assert sorted(groups_by_kind(model)["attn.proj.weight"]) == sorted(
        name for name in every if name.endswith("attn.proj.weight")
    )
    assert groups_by_kind(model)["patch_embed.proj.weight"] == ["patch_embed.proj.weight"]
    matmul = next(name for name in groups_by_layer(model) if name.endswith("attn.matmul1 inputs"))
    assert groups_by_layer(model)[matmul] == [matmul.replace(" inputs", ".a"), matmul.replace(" inputs", ".b")]


def test_only_quantizing_sets_and_restores_modes_even_on_error() -> None:
    model = quantized_tiny()
    set_mode(model, QuantMode.QUANT)
    point = "blocks.1.mlp.fc2.input"
    with pytest.raises(RuntimeError), only_quantizing(model, [point]):
        modes = {name: q.mode for name, q in quantizers(model).items()}
        assert modes.pop(point) is QuantMode.QUANT
        assert set(modes.values()) == {QuantMode.OFF}
        raise RuntimeError("boom")
    assert {q.mode for q in quantizers(model).values()} == {QuantMode.QUANT}


def test_unknown_point_is_named_in_the_error() -> None:
    model, missing = quantized_tiny(), "blocks.9.attn.qkv.input"
    with pytest.raises(LrpqError, match=re.escape(missing)), only_quantizing(model, [missing]):
        pass


def test_breakdown_matches_whole_model_noise_and_isolates_groups() -> None:
    model = quantized_tiny()
    x = tiny_input("vit", 6, seed=3)
    every = list(quantizers(model))
    result = noise_breakdown(model, x, {"none": [], "all": every, "fc2": ["blocks.1.mlp.fc2.input"]}, batch_size=4)
    with torch.no_grad():
        set_mode(model, QuantMode.OFF)
        reference = model(x)
        set_mode(model, QuantMode.QUANT)
        quantized = model(x)
    assert result["none"] == math.inf
    assert result["all"] == pytest.approx(snr_db(reference, quantized), abs=1e-4)
    assert result["all"] < result["fc2"] < math.inf  # one point's noise is part of the whole


def test_fewer_bits_at_a_layer_show_as_lower_snr_of_that_layer() -> None:
    layer = "blocks.0.mlp.fc1"
    wide = quantized_tiny(config=QuantConfig(6, 6, bit_plan=BitPlan({layer: LayerBits(8, 8)})))
    narrow = quantized_tiny(config=QuantConfig(6, 6, bit_plan=BitPlan({layer: LayerBits(3, 3)})))
    x = tiny_input("vit", 6, seed=3)
    wide_db = noise_breakdown(wide, x, groups_by_layer(wide))
    narrow_db = noise_breakdown(narrow, x, groups_by_layer(narrow))
    for group in (f"{layer} inputs", f"{layer} weight"):
        assert narrow_db[group] < wide_db[group] - 10.0  # five bits are worth ~30 dB at the layer
