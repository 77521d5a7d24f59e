"""The benchmark's table, headline configuration and result file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lrpq import bench
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
