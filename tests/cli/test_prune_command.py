"""``lrpq prune`` end to end on a tiny card, then eval and quantize of the result; every bad input is one error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import assert_one_error_line, run_cli, write_class_images
from safetensors.torch import save_file

from lrpq.models import build_model, resolve_model
from lrpq.runs import load_run

CLASSES = ["cat", "dog"]
DEPTH = 4  # the paper allocator of `quantize --mixed` raises the first two blocks, so it needs more
TINY_KWARGS = {"img_size": 32, "patch_size": 8, "depth": DEPTH, "embed_dim": 48, "num_heads": 2, "num_classes": 2}
DATA_CONFIG = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0}


def write_card(folder: Path, name: str, checkpoint: str, kwargs: dict) -> Path:
    card = {"timm_name": "vit_tiny_patch16_224", "kwargs": kwargs, "checkpoint": checkpoint}
    path = folder / name
    path.write_text(json.dumps({**card, "data_config": DATA_CONFIG, "classes": CLASSES}))
    return path


def save_random_weights(path: Path, **kwargs: object) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_KWARGS, **kwargs)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prune-cli")
    save_random_weights(root / "tiny.safetensors")
    write_class_images(root / "data", CLASSES)
    return {
        "root": root,
        "card": write_card(root, "tiny.json", "tiny.safetensors", TINY_KWARGS),
        "data": root / "data",
    }


def test_prune_then_eval_then_quantize_mixed_then_eval(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, data = workspace["root"], workspace["data"]
    run = root / "pruned"
    argv = ["prune", workspace["card"], "--heads", "0.5", "--mlp", "0.3", "--criterion", "lrp", "--calib-data", data]
    status, out, err = run_cli([*argv, "--calib-size", "4", "--out", run], capsys)
    assert status == 0, err
    assert "4 heads and 540 hidden channels kept" in out  # 4 blocks × ⌈0.5·2⌉ heads, × ⌈0.7·192⌉ = 135 channels
    summary = json.loads((run / "summary.json").read_text())
    assert summary["criterion"] == "lrp" and summary["recovery"] is True and summary["calibration_images"] == 4
    assert summary["params_after"] < summary["params_before"] and summary["flops_after"] < summary["flops_before"]
    assert "blocks.1" in (run / "summary.txt").read_text()
    assert json.loads((run / "scores.json").read_text())["criterion"] == "lrp"

    status, out, err = run_cli(["eval", run, "--data", data], capsys)
    assert status == 0, err
    assert "on 8 images" in out

    quantized = root / "quantized"
    argv = ["quantize", run / "model.json", "--wbits", "4", "--mixed", "--calib-data", data, "--calib-size", "4"]
    status, out, err = run_cli([*argv, "--relevance-images", "4", "--out", quantized], capsys)
    assert status == 0, err
    summary = json.loads((quantized / "summary.json").read_text())
    assert summary["packed_bytes"] == (quantized / "model.packed.safetensors").stat().st_size
    assert f"packed {summary['packed_bytes']} bytes" in out
    float_model = build_model(resolve_model(str(run)))
    assert summary["params"] == sum(p.numel() for p in float_model.parameters())
    model, spec, _ = load_run(quantized)
    assert [block.mlp.fc1.out_features for block in model.blocks] == [135] * DEPTH
    assert spec.pruning is not None
    status, out, err = run_cli(["eval", quantized, "--data", data, "--against-float"], capsys)
    assert status == 0, err


def test_unstructured_only_needs_no_images(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run = workspace["root"] / "sparse"
    status, out, err = run_cli(["prune", workspace["card"], "--unstructured", "0.5", "--out", run], capsys)
    assert status == 0, err
    assert "block weights 50.0% zero" in out
    assert json.loads((run / "summary.json").read_text())["sparsity"]["sparsity"] == 0.5


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--heads", "1"], ["--heads", "'1'", "[0, 1)"]),
        (["--mlp", "-0.1"], ["--mlp", "[0, 1)"]),
        (["--mlp", "0.3", "--criterion", "taylor"], ["--criterion", "taylor"]),
        (["--mlp", "0.3", "--criterion", "thinet"], ["thinet", "--calib-data"]),
        (["--mlp", "0.3", "--criterion", "l1"], ["recovery", "--calib-data"]),
        ([], ["nothing to prune"]),
    ],
)
def test_bad_requests_are_one_error_line(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: list[str], named: list[str]
) -> None:
    out = workspace["root"] / "never"
    status, _, err = run_cli(["prune", workspace["card"], *extra, "--out", out], capsys)
    assert_one_error_line(status, err, *named)
    assert not out.exists()


def test_existing_output_and_unprunable_models(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = workspace["root"] / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("the user's")  # an empty folder would simply be used
    argv = ["prune", workspace["card"], "--mlp", "0.3", "--criterion", "l1", "--no-recovery", "--out", taken]
    status, _, err = run_cli(argv, capsys)
    assert_one_error_line(status, err, str(taken), "already exists")
    assert [path.name for path in taken.iterdir()] == ["keep.txt"]
    monkeypatch.delenv("LRPQ_CALIB_DATA", raising=False)
    save_random_weights(workspace["root"] / "normed.safetensors", scale_mlp_norm=True)
    card = write_card(workspace["root"], "normed.json", "normed.safetensors", {**TINY_KWARGS, "scale_mlp_norm": True})
    out = workspace["root"] / "never"
    argv = ["prune", card, "--mlp", "0.3", "--criterion", "l1", "--no-recovery", "--out", out]
    status, _, err = run_cli(argv, capsys)
    assert_one_error_line(status, err, "mixes them")
    assert not out.exists()
