"""``lrpq quantize --recover``: the run says it was recovered, loads and evaluates; bad specs are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import assert_one_error_line, quantize_args, run_cli, write_class_images
from safetensors.torch import save_file

from lrpq.recovery import DEFAULT_LOSS, RECOVERY_WEIGHT_RANGE, RecoveryConfig
from lrpq.runs import load_run

CLASSES = ["cat", "dog"]
KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2, "num_classes": 2}
DATA_CONFIG = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model card with random weights and 8 PNG images in 2 class folders (as tests/cli/test_cli.py's)."""
    root = tmp_path_factory.mktemp("recovery-cli")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(root / "tiny.safetensors"))
    card = {"timm_name": "vit_tiny_patch16_224", "kwargs": KWARGS, "checkpoint": "tiny.safetensors"}
    (root / "tiny.json").write_text(json.dumps({**card, "data_config": DATA_CONFIG, "classes": CLASSES}))
    write_class_images(root / "data", CLASSES)
    return {"card": root / "tiny.json", "data": root / "data"}


def test_recover_writes_a_recovered_run_that_loads_and_evaluates(
    workspace: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    args = quantize_args(workspace, "--wbits", "4", "--recover", "--recover-steps", "3", "--out", out)
    status, stdout, _ = run_cli(args, capsys)
    assert status == 0 and f"recovered by {DEFAULT_LOSS}" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recovered"] is True
    assert (summary["recovery_loss"], summary["recovery_steps"]) == (DEFAULT_LOSS, 3)
    assert summary["recovery_learned"] == ",".join(RecoveryConfig().learn) and summary["recovery_seconds"] > 0
    assert "recovery_loss" in (out / "summary.txt").read_text()
    recovery = json.loads((out / "config.json").read_text())["recovery"]
    assert RecoveryConfig.from_json_dict(recovery) == RecoveryConfig(steps=3)
    model, _, _ = load_run(out)
    with torch.inference_mode():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
    status, stdout, _ = run_cli(["eval", out, "--data", workspace["data"]], capsys)
    assert status == 0 and "top-1" in stdout


def test_a_named_combination_and_a_plain_run(
    workspace: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, _, _ = run_cli(
        quantize_args(
            workspace,
            "--recover",
            "KD:0.5+mse",
            "--recover-steps",
            "2",
            "--recover-drop",
            "0.5",
            "--recover-learn",
            "scales",
            "rounding",  # any order: stored in LEARNABLE's
            "--out",
            tmp_path / "a",
        ),
        capsys,
    )
    assert status == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert (summary["recovery_loss"], summary["recovery_drop"]) == ("KD:0.5+mse", 0.5)
    assert summary["recovery_learned"] == "rounding,scales"
    recovery = json.loads((tmp_path / "a" / "config.json").read_text())["recovery"]
    assert (recovery["drop"], recovery["learn"]) == (0.5, ["rounding", "scales"])
    status, _, _ = run_cli(quantize_args(workspace, "--out", tmp_path / "b"), capsys)
    assert status == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["recovered"] is False
    assert "recovery" not in json.loads((tmp_path / "b" / "config.json").read_text())


@pytest.mark.parametrize(
    ("flags", "weight_range"),
    [
        (["--recover", "--recover-steps", "1"], RECOVERY_WEIGHT_RANGE),
        (["--recover", "--recover-steps", "1", "--weight-range", "mse"], "mse"),
        (["--recover", "--recover-steps", "1", "--no-gptq"], "mse"),  # the input-weighted ranges need GPTQ
        ([], "mse"),
    ],
)
def test_a_run_to_be_recovered_gets_the_input_weighted_ranges_unless_told_otherwise(
    flags: list[str], weight_range: str, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_cli(quantize_args(workspace, *flags, "--out", tmp_path / "run"), capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["quant"]["weight_range_metric"] == weight_range
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["weight_range_metric"] == weight_range


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--recover", "kd+nope"], ("unknown distillation loss 'nope'", "accepted: kd")),
        (["--recover", "kd:-1"], ("weight of 'kd'",)),
        (["--recover", "mse+mse"], ("appears twice",)),
        (["--recover-steps", "5"], ("--recover-steps", "--recover")),
        (["--recover-drop", "0.5"], ("--recover-drop", "--recover")),
        (["--recover", "--recover-drop", "1"], ("drop=1.0", "probability in [0, 1)")),
        (["--recover-learn", "scales"], ("--recover-learn", "--recover")),
        (["--recover", "--recover-learn", "weights"], ("--recover-learn", "'weights'", "'rounding', 'scales'")),
        (["--recover", "--recover-learn", "norms", "norms"], ("each once", "norms, norms")),
    ],
)
def test_bad_recovery_requests_are_one_line_before_any_work(
    workspace: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    named: tuple[str, ...],
) -> None:
    status, _, err = run_cli(quantize_args(workspace, *extra, "--out", tmp_path / "run"), capsys)
    assert_one_error_line(status, err, *named)
    assert not (tmp_path / "run").exists()


def test_recover_steps_must_be_positive(
    workspace: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, _, err = run_cli(quantize_args(workspace, "--recover", "--recover-steps", "0"), capsys)
    assert status == 2 and "not a positive integer" in err
