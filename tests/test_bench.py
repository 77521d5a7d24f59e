"""The fast paths the benchmark measures give exactly the reference values; the benchmark table and its file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, tiny_input

from lrpq import bench
from lrpq.api import quantize
from lrpq.bench import (
    BENCH_CONFIG,
    NEAREST_CONFIG,
    REPORTED,
    TARGETS,
    ReadmeTiming,
    display_name,
    fixed_twin,
    format_table,
    readme_command,
)
from lrpq.config import QuantConfig
from lrpq.errors import LrpqError
from lrpq.outputs import OutputError
from lrpq.primitives import (
    dequantize_log2,
    dequantize_log_sqrt2,
    fake_quant_log2,
    fake_quant_log_sqrt2,
    fake_quant_uniform,
    log2_shift_form,
    quantize_log_sqrt2,
    quantize_uniform,
    uniform_qparams,
)


@pytest.mark.parametrize("bits", range(2, 9))
def test_in_place_uniform_fake_quant_equals_the_textbook_formula(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    x = 3.0 * torch.randn(64, 33, generator=generator)
    for lower, upper in ((x.min(), x.max() * 0.5), (x.amin(1, keepdim=True) * 0.7, x.amax(1, keepdim=True))):
        scale, zero_point = uniform_qparams(lower, upper, bits)
        expected = (quantize_uniform(x, scale, zero_point, bits) - zero_point) * scale
        assert torch.equal(fake_quant_uniform(x, scale, zero_point, bits), expected)
        buffer = torch.empty_like(x)
        assert torch.equal(fake_quant_uniform(x, scale, zero_point, bits, out=buffer), expected)


@pytest.mark.parametrize("bits", range(2, 9))
def test_log_grid_lookup_equals_the_elementwise_formulas(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    attn = (4.0 * torch.randn(3, 2, 29, 29, generator=generator)).softmax(dim=-1)
    attn[0, 0, 0, :4] = 0.0
    attn[0, 0, 1, :3] = torch.tensor([float("nan"), float("inf"), -0.5])  # as the formula: NaN, scale, 0
    for scale in (attn.nan_to_num().max(), torch.tensor(0.23), torch.tensor([[[[0.5]], [[0.9]]]])):
        codes, underflow = quantize_log_sqrt2(attn, scale, bits)
        shift, parity = log2_shift_form(codes)
        log2_reference = dequantize_log2(shift, parity, underflow, scale)
        log_sqrt2_reference = dequantize_log_sqrt2(codes, underflow, scale)
        exact = {"rtol": 0.0, "atol": 0.0, "equal_nan": True}
        torch.testing.assert_close(fake_quant_log2(attn, scale, bits), log2_reference, **exact)
        torch.testing.assert_close(fake_quant_log_sqrt2(attn, scale, bits), log_sqrt2_reference, **exact)


@pytest.mark.parametrize("bits", range(2, 9))
def test_log_grid_lookup_rounds_like_the_formula_next_to_every_level_boundary(bits: int) -> None:
    # Every float32 within 512 ulps of each rounding boundary 2^(-(q + 1/2) / 2) of the log√2 grid.
    boundaries = torch.exp2(-(torch.arange(2**bits, dtype=torch.float64) + 0.5) / 2).float()
    offsets = torch.arange(-512, 513, dtype=torch.int32)
    ratios = (boundaries.view(torch.int32).unsqueeze(1) + offsets).view(torch.float32).reshape(-1)
    unit = torch.tensor(1.0)
    codes, underflow = quantize_log_sqrt2(ratios, unit, bits)
    assert torch.equal(fake_quant_log_sqrt2(ratios, unit, bits), dequantize_log_sqrt2(codes, underflow, unit))
    shift, parity = log2_shift_form(codes)
    assert torch.equal(fake_quant_log2(ratios, unit, bits), dequantize_log2(shift, parity, underflow, unit))


def assert_codes_equal_but_near_boundaries(values: torch.Tensor, scale: torch.Tensor, exact: torch.Tensor) -> None:
    """``values / scale`` are the rounding of float64 ``exact`` (clamped as ``values``), but within 1e-4 of a tie.

    Reordering float32 arithmetic moves a value by a few ulps: only a value that close to a rounding
    boundary may land on the neighbouring level, and then on that one only.
    """
    codes = values / scale
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)  # on the grid
    codes = codes.round()
    expected = exact.round().clamp(codes.min().item(), codes.max().item())
    near_tie = ((exact - exact.floor()) - 0.5).abs() < 1e-4
    differs = codes.double() != expected
    assert not (differs & ~near_tie).any()
    assert ((codes.double() - expected).abs() <= 1).all()
    assert differs.double().mean() < 1e-3


@pytest.mark.parametrize("bits", [4, 8])
def test_affine_folded_into_fake_quant_equals_quantizing_the_mapped_tensor(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    x = 3.0 * torch.randn(200, 96, generator=generator)
    weight, bias = torch.rand(96, generator=generator) + 0.2, torch.randn(96, generator=generator)
    scale, zero_point = uniform_qparams(torch.tensor(-4.0), torch.tensor(5.0), bits)
    fused = fake_quant_uniform(x, scale, zero_point, bits, affine=(weight, bias))
    exact = (x.double() * weight.double() + bias.double()) / scale.double()
    assert_codes_equal_but_near_boundaries(fused, scale, exact)
    buffer = x.clone()
    assert torch.equal(fake_quant_uniform(buffer, scale, zero_point, bits, out=buffer, affine=(weight, bias)), fused)


@pytest.mark.parametrize("owned", [True, False])
def test_fused_rotation_fold_and_quantizer_of_fc2_equal_the_float64_reference(owned: bool) -> None:
    model = quantize(build_tiny("vit"), QuantConfig(wbits=4, abits=4), tiny_input("vit", batch=4), progress=False)
    fc2 = model.blocks[1].mlp.fc2
    reparam, quantizer = fc2.input_reparam, fc2.input_quantizer
    hidden = torch.nn.functional.gelu(3.0 * torch.randn(5, 17, 192, generator=torch.Generator().manual_seed(7)))
    rotation = torch.kron(reparam.rotation.left.double(), reparam.rotation.right.double())
    exact = ((hidden.double() @ rotation) / reparam.r.double() - reparam.b.double()) / quantizer.scale.double()
    fc2.input_owned = owned
    given = hidden.clone()
    with torch.inference_mode():
        quantized = fc2._quantized_reparam_input(given)
    assert (quantized.data_ptr() == given.data_ptr()) == owned  # written over the input only when it owns it
    assert_codes_equal_but_near_boundaries(quantized, quantizer.scale, exact)


def test_table_marks_each_metric_against_its_target() -> None:
    good = {"calibration_ratio": 5.0, "relevance_ratio": 2.0, "fakequant_throughput_ratio": 0.8}
    good |= {"calibration_memory_ratio": 1.5, "w4_size_ratio": 0.13, "nearest_calibration_ratio": 4.0}
    bad = {**good, "fakequant_throughput_ratio": 0.4, "w4_size_ratio": 0.3}
    table = format_table({"deit_s": good, "vits14_imagenette": bad}, ReadmeTiming(185.4, 60.0, 24.0))
    lines = table.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert set(rows) == set(TARGETS) | set(REPORTED)
    assert rows["nearest_calibration_ratio"][1:] == ["4.000", "4.000", "–"]  # no target, no mark
    assert rows["fakequant_throughput_ratio"][1:5] == ["0.800", "ok", "0.400", "NO"]
    assert rows["w4_size_ratio"][1:5] == ["0.130", "ok", "0.300", "NO"]
    assert rows["calibration_ratio"][1:5] == ["5.000", "ok", "5.000", "ok"]
    assert lines[-1] == (
        "README main command: --mixed quantization 2.50× fixed bits' (target ≤ 3), "
        "quantize --mixed + eval 3 min 05 s wall"
    )
    assert "README" not in format_table({"deit_s": good})


def test_the_benchmark_headlines_the_default_configuration_and_the_readme_command() -> None:
    assert QuantConfig(wbits=4, abits=4) == BENCH_CONFIG  # GPTQ and every rotation on
    assert QuantConfig(wbits=4, abits=4, gptq=False) == NEAREST_CONFIG
    command = readme_command()
    assert command.startswith("lrpq quantize ") and "&& lrpq eval " in command and "--mixed" in command
    assert display_name("/x/models/vits14_imagenette.json") == "vits14_imagenette"
    fixed = fixed_twin(command.partition(" && ")[0])
    assert "--mixed" not in fixed.split() and fixed.split()[fixed.split().index("--out") + 1].endswith("-fixed")
    with pytest.raises(LrpqError, match="no --mixed"):
        fixed_twin("lrpq quantize deit_s --wbits 4 --out runs/x")


def bench_args(json_path: Path) -> argparse.Namespace:
    return argparse.Namespace(
        models=["deit_s"], repeats=1, images=1, relevance_images=1, json=str(json_path), device="cpu", skip_readme=True
    )


def test_json_is_checked_before_the_benchmark_and_written_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ratios = dict.fromkeys([*TARGETS, *REPORTED], 1.0)
    calls = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *args: calls.append(args) or {"deit_s": ratios})
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputError, match="Not a directory"):
        bench.run_from_args(bench_args(tmp_path / "file" / "bench.json"))
    assert calls == []  # refused before hours of benchmarking

    monkeypatch.setattr(bench, "format_table", lambda *_: 1 / 0)  # fails after the measurements
    with pytest.raises(ZeroDivisionError):
        bench.run_from_args(bench_args(tmp_path / "bench.json"))
    assert [path.name for path in tmp_path.iterdir()] == ["file"]  # no half-written file, no staging file
    monkeypatch.undo()
    monkeypatch.setattr(bench, "run_benchmark", lambda *args: {"deit_s": ratios})
    assert bench.run_from_args(bench_args(tmp_path / "bench.json")) == 0
    assert json.loads((tmp_path / "bench.json").read_text()) == {"deit_s": ratios, "readme_command_seconds": None}
    assert "deit_s" in capsys.readouterr().out
