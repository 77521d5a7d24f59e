"""Measured per-layer, per-width logit noise and the bit plans the sensitivity allocator makes from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, build_tiny, reference_snrs, tiny_input
from timm.layers import LayerScale

from lrpq.allocation.budget import layer_costs
from lrpq.allocation.noise_measurement import LayerNoise, measure_layer_noise, noise_config
from lrpq.allocation.plans import plan_widths
from lrpq.api import quant_layers, quantize
from lrpq.config import BitPlan, LayerBits, QuantConfig
from lrpq.data import draw_calibration_set, load_calibration_images
from lrpq.models import build_model, resolve_model
from lrpq.modules import QuantMatMul


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_quantized_layer_is_measured_at_every_width_and_more_bits_mean_less_noise(family: str) -> None:
    model = build_tiny(family)
    for module in model.modules():
        if isinstance(module, LayerScale):  # timm starts it at 1e-5: blocks would move the logits by rounding only
            module.gamma.data.fill_(1.0)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    noise = measure_layer_noise(model, QuantConfig(4, 4), tiny_input(family, 4), (3, 6), images=2, progress=False)
    assert not quant_layers(model)  # the float model is left as it was
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    quantized = quantize(build_tiny(family), QuantConfig(4, 4), tiny_input(family, 4), progress=False)
    layers = quant_layers(quantized)
    assert set(noise.noise) == set(layers)  # the patch embedding and head too: the budget counts them
    assert noise.pinned_abits == {"patch_embed.proj": 8}  # the image, at conv_abits whatever the target
    for name, kinds in noise.noise.items():
        measured = {"weight"} if name in noise.pinned_abits else {"inputs", "weight"}
        assert set(kinds) == ({"inputs"} if isinstance(layers[name], QuantMatMul) else measured)
        for kind, curve in kinds.items():
            assert sorted(curve) == [3, 4, 5, 6]
            assert curve[3] > curve[6] >= 0, (name, kind, curve)  # 3 bits: ~64x the noise power of 6


def layer_plan(noise: LayerNoise, model: torch.nn.Module, image_size: tuple[int, int, int], bits: int):
    """The measured plan at the paper's layer budget (both means exactly ``bits``)."""
    costs = layer_costs(model, image_size)
    return plan_widths(
        noise.curves("weight"), noise.curves("inputs"), (bits, bits), "layers", costs, noise.pinned_abits
    )


def test_measured_plan_meets_both_budgets_and_gives_the_noisiest_points_more_bits() -> None:
    model = build_tiny("vit")
    noise = measure_layer_noise(model, QuantConfig(4, 4), tiny_input("vit", 4), (3, 6), images=2, progress=False)
    plan = layer_plan(noise, model, (3, 32, 32), 4)
    assert list(plan.layers) == list(noise.noise)
    weighted = [name for name in plan.layers if "weight" in noise.noise[name]]
    assert sum(plan.layers[name].wbits for name in weighted) == 4 * len(weighted)
    assert plan.layers["patch_embed.proj"].abits == 8  # pinned, outside the activation budget
    allocated = [bits.abits for name, bits in plan.layers.items() if name != "patch_embed.proj"]
    assert sum(allocated) == 4 * len(allocated)
    assert len({bits.abits for bits in plan.layers.values()}) > 1  # measured noise differs, so bits do
    inputs = noise.curves("inputs")
    gain = {name: curve[3] - curve[6] for name, curve in inputs.items()}
    assert plan.layers[max(gain, key=gain.get)].abits >= plan.layers[min(gain, key=gain.get)].abits


def test_layer_noise_file_names_every_layer_kind_and_width(tmp_path: Path) -> None:
    noise = measure_layer_noise(
        build_tiny("vit"), QuantConfig(4, 4), tiny_input("vit", 2), (4, 5), images=2, progress=False
    )
    noise.save(tmp_path / "noise.json")
    data = json.loads((tmp_path / "noise.json").read_text())
    assert data["num_images"] == 2
    assert data["noise"]["blocks.0.attn.qkv"]["weight"].keys() == {"4", "5"}


def test_measurement_needs_images_it_has() -> None:
    with pytest.raises(Exception, match="images=3 must be between 1 and the 2"):
        measure_layer_noise(build_tiny("vit"), QuantConfig(4, 4), tiny_input("vit", 2), (4, 5), images=3)


@pytest.mark.shared
def test_reference_vit_sensitivity_plan_lowers_w4a4_logit_noise(shared_dir: Path) -> None:
    """On ref-A the plan from measured noise must beat fixed W4A4 at the same mean bits by a clear share
    of the noise power (measured on these images: 17.2 dB fixed, 19.9 dB with the plan, which gives the
    patch-embedding weight, the largest single noise point, more bits)."""
    spec = resolve_model(str(shared_dir / "models" / "vit_cifar10.json"))
    calib = load_calibration_images(
        draw_calibration_set(shared_dir / "data" / "cifar10" / "calib", 8, 0), spec.data_config
    )
    model = build_model(spec)
    noise = measure_layer_noise(model, QuantConfig(4, 4), calib, (3, 6), progress=False)
    plan = layer_plan(noise, model, tuple(calib.shape[1:]), 4)
    configs = {"fixed": QuantConfig(4, 4), "measured": QuantConfig(4, 4).with_plan(plan)}
    snr = reference_snrs(shared_dir, "vit_cifar10", "cifar10", 8, 100, configs)
    assert snr["measured"] > snr["fixed"] + 1.5, snr  # 30% less noise power at least


def test_noise_config_rounds_to_nearest_on_the_weights_own_ranges_whatever_the_run_uses() -> None:
    plan = BitPlan({"head": LayerBits(6, 6)})
    run = QuantConfig(4, 4, weight_range_metric="inputs", bias_correction=True, clip_k=2.0, bit_plan=plan)
    config = noise_config(run, wbits=3, abits=3)  # a config "inputs" alone would refuse without GPTQ
    assert (config.wbits, config.abits, config.bit_plan) == (3, 3, BitPlan())
    assert (config.gptq, config.weight_range_metric, config.bias_correction) == (False, "mse", False)
    assert config.clip_k == 2.0  # the method's own switches stay the run's
