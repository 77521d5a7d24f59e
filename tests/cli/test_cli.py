"""``lrpq`` command line: every bad input is exit status 2 with one error line naming it; one happy path.

Calls ``lrpq.cli.main`` in-process (fast); a single subprocess proves the same end to end for ``python -m lrpq``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import timm
import torch
from conftest import MISSING_CARD, assert_one_error_line, quantize_args, run_cli, write_class_images
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform

from lrpq.api import set_mode, weighted_layers
from lrpq.cli import main
from lrpq.models import build_model, resolve_model
from lrpq.quantizers import QuantMode
from lrpq.runs import load_run

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["cat", "dog"]
TINY_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2, "num_classes": 2}
DATA_CONFIG = {
    "input_size": [3, 32, 32],
    "interpolation": "bilinear",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "crop_pct": 1.0,
    "crop_mode": "center",
}


def write_card(folder: Path, name: str, checkpoint: str, kwargs: dict | None = None) -> Path:
    card = {
        "timm_name": "vit_tiny_patch16_224",
        "kwargs": kwargs or TINY_KWARGS,
        "checkpoint": checkpoint,
        "data_config": DATA_CONFIG,
        "classes": CLASSES,
    }
    path = folder / name
    path.write_text(json.dumps(card))
    return path


def random_state(seed: int, **overrides: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY_KWARGS, **overrides})
    return {key: value.contiguous() for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model card with random weights, a wrong checkpoint, and 8 PNG images in 2 class folders."""
    root = tmp_path_factory.mktemp("cli")
    save_file(random_state(0), str(root / "tiny.safetensors"))
    save_file(random_state(0, embed_dim=32), str(root / "wrong.safetensors"))
    data = write_class_images(root / "data", CLASSES)
    (root / "empty").mkdir()
    return {
        "root": root,
        "card": write_card(root, "tiny.json", "tiny.safetensors"),
        "wrong_card": write_card(root, "wrong.json", "wrong.safetensors"),
        "data": data,
    }


def test_unknown_model_suggests_close_names(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_cli(["quantize", "vit_tiny_patch16_22", "--wbits", "8"], capsys)
    line = assert_one_error_line(status, err, "'vit_tiny_patch16_22'", "did you mean")
    assert "vit_tiny_patch16_224" in line


@pytest.mark.parametrize("bits", ["2", "9", "four"])
def test_unsupported_bit_widths_are_argparse_errors(bits: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_cli(["quantize", "deit_t", "--wbits", bits], capsys)
    assert_one_error_line(status, err, "--wbits", f"'{bits}'")


def test_missing_data_folder(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    missing = workspace["root"] / "no_such_folder"
    status, _, err = run_cli(["quantize", workspace["card"], "--wbits", "8", "--calib-data", missing], capsys)
    assert_one_error_line(status, err, str(missing), "does not exist")


def test_empty_data_folder(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    empty = workspace["root"] / "empty"
    status, _, err = run_cli(["quantize", workspace["card"], "--wbits", "8", "--calib-data", empty], capsys)
    assert_one_error_line(status, err, str(empty), "no images")


def test_fewer_images_than_calib_size(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["quantize", workspace["card"], "--wbits", "8", "--calib-data", workspace["data"], "--calib-size", "9"]
    status, _, err = run_cli(argv, capsys)
    assert_one_error_line(status, err, "9", str(workspace["data"]), "has 8")


def test_checkpoint_that_does_not_fit(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["quantize", workspace["wrong_card"], "--wbits", "8", "--calib-data", workspace["data"], "--calib-size", "4"]
    status, _, err = run_cli(argv, capsys)
    assert_one_error_line(status, err, "wrong.safetensors", "does not fit")


def test_bit_plan_naming_missing_layers(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    plan = workspace["root"] / "bad_bits.json"
    plan.write_text(json.dumps({"layers": {"blocks.9.attn.qkv": {"wbits": 4, "abits": 4}}}))
    out = workspace["root"] / "never_written"
    status, _, err = run_cli(quantize_args(workspace, "--bit-plan", plan, "--out", out), capsys)
    assert_one_error_line(status, err, "blocks.9.attn.qkv")
    assert not out.exists()


def test_existing_out_folder(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = workspace["root"] / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    status, _, err = run_cli(quantize_args(workspace, "--out", out), capsys)
    assert_one_error_line(status, err, str(out), "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_no_reparam_flags_reach_the_saved_config(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run = workspace["root"] / "plain"
    flags = (
        "--no-ln-reparam",
        "--no-gelu-reparam",
        "--no-key-centring",
        "--no-head-rotation",
        "--no-hidden-rotation",
        "--no-gptq",
    )
    status, _, err = run_cli(quantize_args(workspace, *flags, "--out", run), capsys)
    assert status == 0, err
    config = json.loads((run / "config.json").read_text())["quant"]
    summary = json.loads((run / "summary.json").read_text())
    switches = ("ln_reparam", "post_gelu_reparam", "center_keys", "rotate_heads", "rotate_hidden", "gptq")
    assert [config[name] for name in switches] == [summary[name] for name in switches] == [False] * 6
    model, _, _ = load_run(run)
    assert all(getattr(layer, "input_reparam", None) is None for layer in model.modules())


def test_bias_correction_flag_reaches_the_saved_config_and_the_run_reloads(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run = workspace["root"] / "corrected"
    status, _, err = run_cli(quantize_args(workspace, "--bias-correction", "--out", run), capsys)
    assert status == 0, err
    assert json.loads((run / "config.json").read_text())["quant"]["bias_correction"] is True
    model, _, _ = load_run(run)  # strict load: every corrected layer has its bias in the file
    assert all(layer.bias is not None for layer in weighted_layers(model).values())


@pytest.mark.parametrize(
    ("flags", "key", "value"),
    [
        (["--range-metric", "output"], "range_metric", "output"),
        (["--weight-range", "inputs"], "weight_range_metric", "inputs"),
    ],
)
def test_calibration_flags_reach_the_saved_config_the_summary_and_a_reloaded_run(
    flags: list[str], key: str, value: object, workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run = workspace["root"] / key
    status, _, err = run_cli(quantize_args(workspace, *flags, "--out", run), capsys)
    assert status == 0, err
    assert json.loads((run / "config.json").read_text())["quant"][key] == value
    assert json.loads((run / "summary.json").read_text())[key] == value
    load_run(run)  # strict load: the chosen grids and roundings are the stored ones


def test_an_unknown_range_metric_is_one_line_naming_the_choices(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_cli(quantize_args(workspace, "--range-metric", "sqnr"), capsys)
    assert status == 2 and "sqnr" in err and "mse" in err and "output" in err


def test_input_weighted_ranges_without_gptq_are_a_one_line_error(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_cli(quantize_args(workspace, "--weight-range", "inputs", "--no-gptq"), capsys)
    assert status != 0 and "weight_range_metric='inputs'" in err and "gptq" in err and "\n" not in err.strip()


def test_batch_size_reaches_calibration_and_the_summary(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    states = {}
    for batch in (2, 4):
        run = workspace["root"] / f"batch-{batch}"
        status, _, err = run_cli(quantize_args(workspace, "--batch-size", str(batch), "--out", run), capsys)
        assert status == 0, err
        assert json.loads((run / "summary.json").read_text())["calibration_batch_size"] == batch
        states[batch] = load_file(run / "model.safetensors")
    # Two batches of two average their per-batch ranges; one batch of four does not.
    assert any(not torch.equal(states[2][key], states[4][key]) for key in states[4])
    status, _, err = run_cli(quantize_args(workspace, "--batch-size", "0"), capsys)
    assert status == 2 and "'0' is not a positive integer" in err


def reference_top1(run: Path, data: Path) -> float:
    """Top-1 of the run's quantized model, with timm's own transform and a plain loop (no lrpq.data)."""
    model, _, _ = load_run(run)
    set_mode(model, QuantMode.QUANT)  # the quantized function, whatever mode load_run leaves
    return plain_top1(model, data)


def plain_top1(model: torch.nn.Module, data: Path) -> float:
    """Top-1 of ``model`` on the 8 workspace images, with timm's own transform and a plain loop."""
    transform = create_transform(**DATA_CONFIG, is_training=False)
    correct = total = 0
    for label, class_name in enumerate(CLASSES):
        for path in sorted((data / class_name).iterdir()):
            with Image.open(path) as image:
                x = transform(image.convert("RGB")).unsqueeze(0)
            with torch.no_grad():
                correct += int(model(x).argmax(1).item() == label)
            total += 1
    assert total == 8
    return 100.0 * correct / total


@pytest.fixture(scope="module")
def happy_path(workspace: dict[str, Path]) -> dict[str, object]:
    """``lrpq quantize CARD ... --out RUN`` then ``lrpq eval RUN --data DIR --json F``, run once per module."""
    run, result = workspace["root"] / "run", workspace["root"] / "result.json"
    outputs: dict[str, object] = {"run": run, "result": result}
    argvs = {
        "quantize": quantize_args(workspace, "--out", run),
        "eval": ["eval", run, "--data", workspace["data"], "--json", result],
    }
    for command, argv in argvs.items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main([str(arg) for arg in argv])
        outputs[command] = (status, out.getvalue(), err.getvalue())
    return outputs


def test_quantize_then_eval_happy_path(happy_path: dict[str, object]) -> None:
    run, result = happy_path["run"], happy_path["result"]
    status, out, err = happy_path["quantize"]
    assert status == 0, err
    assert str(run) in out and "W8A8" in out
    assert (run / "model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["calibration_images"] == 4
    assert summary["gptq"] is True and summary["bias_correction"] is False  # the defaults, said in the summary

    status, out, err = happy_path["eval"]
    assert status == 0, err
    payload = json.loads(result.read_text())
    assert payload["n"] == 8
    assert payload["top1"] in {100.0 * k / 8 for k in range(9)}
    assert payload["top5"] is None  # 2 classes: top-5 would always be 100 %
    assert payload["skipped"] == 0
    assert f"top-1 {payload['top1']:.2f}%" in out


def test_eval_of_a_run_reports_the_quantized_accuracy(
    happy_path: dict[str, object], workspace: dict[str, Path]
) -> None:
    payload = json.loads(happy_path["result"].read_text())
    assert payload["top1"] == pytest.approx(reference_top1(happy_path["run"], workspace["data"]))


def test_eval_against_float_pairs_the_run_with_its_float_model(
    happy_path: dict[str, object], workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    result = workspace["root"] / "paired.json"
    argv = ["eval", happy_path["run"], "--data", workspace["data"], "--against-float", "--json", result]
    status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    payload = json.loads(result.read_text())
    assert payload["top1"] == pytest.approx(reference_top1(happy_path["run"], workspace["data"]))
    float_model = build_model(resolve_model(str(workspace["card"])))
    assert payload["reference"]["top1"] == pytest.approx(plain_top1(float_model, workspace["data"]))
    assert payload["reference"]["n"] == payload["n"] == 8
    gained, lost = payload["right_only_model"], payload["right_only_reference"]
    assert payload["top1"] - payload["reference"]["top1"] == pytest.approx(payload["difference"])
    assert payload["difference"] == pytest.approx(100 * (gained - lost) / 8)
    low, high = payload["difference_ci95"]
    assert low <= payload["difference"] <= high
    assert f"vs float {payload['reference']['top1']:.2f}%" in out

    status, _, err = run_cli(["eval", workspace["card"], "--data", workspace["data"], "--against-float"], capsys)
    assert_one_error_line(status, err, "--against-float", str(workspace["card"]), "not a run directory")


def test_python_m_lrpq_exits_2_without_traceback(python_m_lrpq: tuple[int, str, str, Path]) -> None:
    """``python -m lrpq quantize <missing card> --wbits 8``, launched by conftest right after collection."""
    status, _, stderr, folder = python_m_lrpq
    assert status == 2
    assert "Traceback" not in stderr
    assert stderr.strip().count("\n") == 0  # exactly one line
    assert str(folder / MISSING_CARD) in stderr and "does not exist" in stderr
    assert stderr.startswith("lrpq quantize: error: ")
    assert list(folder.iterdir()) == []  # nothing written (no default runs/ folder)


def mixed_w4_run(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str], name: str, *extra: str
) -> tuple[Path, dict[str, dict[str, int]]]:
    """``lrpq quantize CARD --wbits 4 --mixed EXTRA --out ROOT/NAME``: the run folder and its per-layer bits."""
    out = workspace["root"] / name
    args = quantize_args(workspace, "--mixed", *extra, "--out", out)
    args[args.index("--wbits") + 1] = "4"
    status, _, err = run_cli(args, capsys)
    assert status == 0, err
    return out, json.loads((out / "bits.json").read_text())["layers"]


def test_mixed_run_writes_scores_and_a_plan_at_the_layer_budget(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out, bits = mixed_w4_run(
        workspace, capsys, "mixed", "--allocator", "exact", "--budget", "layers", "--relevance-images", "4"
    )
    allocated = {layer: bits[layer] for layer in bits if layer.startswith("blocks.")}  # relevance plans blocks
    assert sum(layer["abits"] for layer in allocated.values()) == 4 * len(allocated)
    assert {"scores.json", "scores.csv", "bits.json"} <= {path.name for path in out.iterdir()}
    assert len({layer["abits"] for layer in allocated.values()}) > 1  # mixed, not uniform
    summary = json.loads((out / "summary.json").read_text())
    assert summary["allocator"] == "exact" and summary["budget"] == "layers" and summary["relevance_images"] == 4


@pytest.mark.parametrize("allocator", ["sensitivity", "relevance"])
def test_default_budget_holds_a_measured_plan_to_the_fixed_size_and_bops(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str], allocator: str
) -> None:
    extra = ("--allocator", allocator, "--noise-images", "2", "--relevance-images", "2")
    out, bits = mixed_w4_run(workspace, capsys, f"measured-{allocator}", *extra)
    names = {path.name for path in out.iterdir()}
    assert {"noise.json", "bits.json"} <= names and ("scores.json" in names) == (allocator == "relevance")
    noise = json.loads((out / "noise.json").read_text())
    assert noise["num_images"] == 2 and set(noise["noise"]) == set(bits)  # every quantized layer
    summary = json.loads((out / "summary.json").read_text())
    assert summary["allocator"] == allocator and summary["budget"] == "bops" and summary["noise_images"] == 2
    assert summary["size_vs_fixed"] <= 1.0 and summary["bops_vs_fixed"] <= 1.0
    assert len({layer["abits"] for name, layer in bits.items() if name not in noise["pinned_abits"]}) > 1


def test_paper_rule_on_a_two_block_model_is_an_infeasible_allocation(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = quantize_args(
        workspace, "--mixed", "--allocator", "paper", "--relevance-images", "2", "--out", workspace["root"] / "never"
    )
    args[args.index("--wbits") + 1] = "4"
    status, _, err = run_cli(args, capsys)
    assert_one_error_line(status, err, "raised_blocks")
    assert not (workspace["root"] / "never").exists()


def test_paper_rule_has_only_the_layer_budget(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = workspace["root"] / "never_paper_size"
    args = quantize_args(workspace, "--mixed", "--allocator", "paper", "--budget", "size", "--out", out)
    status, _, err = run_cli(args, capsys)
    assert_one_error_line(status, err, "paper rule", "'size'")
    assert not out.exists()


def test_mixed_and_bit_plan_together_are_rejected(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    plan = workspace["root"] / "plan.json"
    plan.write_text('{"layers": {}}')
    status, _, err = run_cli(quantize_args(workspace, "--mixed", "--bit-plan", plan), capsys)
    assert_one_error_line(status, err, "--mixed", "--bit-plan")


def test_relevance_command_writes_scores_chart_and_heat_maps(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = workspace["root"] / "relevance"
    argv = ["relevance", workspace["card"], "--data", workspace["data"], "--num-images", "3", "--heatmaps", "2"]
    status, _, err = run_cli([*argv, "--allocator", "exact", "--wbits", "3.5", "--out", out], capsys)
    assert status == 0, err
    names = {path.name for path in out.iterdir()}
    assert names == {"scores.json", "scores.csv", "importance.png", "heatmap_0.png", "heatmap_1.png"}
    scores = json.loads((out / "scores.json").read_text())
    assert scores["num_images"] == 3


def test_relevance_refuses_fractional_bits_for_the_paper_rule_before_any_work(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = workspace["root"] / "relevance_paper_fractional"
    missing = workspace["root"] / "no_such_folder"  # refused before the data is even looked at
    argv = ["relevance", workspace["card"], "--data", missing, "--wbits", "3.5", "--out", out]
    status, _, err = run_cli(argv, capsys)
    line = assert_one_error_line(status, err, "3.5 bits", "--allocator exact")
    assert "sensitivity" not in line  # an allocator of `quantize`, not of `relevance`
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "named"),
    [((), ("3.5 bits", "--mixed")), (("--mixed", "--allocator", "paper"), ("3.5 bits", "paper rule"))],
)
def test_fractional_bits_need_a_budgeted_mixed_plan(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], named: tuple[str, ...]
) -> None:
    out = workspace["root"] / "never_fractional"
    args = quantize_args(workspace, *extra, "--out", out)
    args[args.index("--wbits") + 1] = "3.5"
    status, _, err = run_cli(args, capsys)
    assert_one_error_line(status, err, *named)
    assert not out.exists()


def test_fractional_mean_bits_with_the_exact_allocator(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = workspace["root"] / "fractional"
    args = quantize_args(
        workspace, "--mixed", "--allocator", "exact", "--budget", "layers", "--relevance-images", "4", "--out", out
    )
    args[args.index("--wbits") + 1] = "3.5"
    status, _, err = run_cli(args, capsys)
    assert status == 0, err
    bits = json.loads((out / "bits.json").read_text())["layers"]
    blocks = {name: layer for name, layer in bits.items() if name.startswith("blocks.")}  # relevance plans blocks
    weighted = [name for name in blocks if name.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2")]
    assert len(weighted) == 8 and sum(blocks[name]["wbits"] for name in weighted) == 28  # 3.5 · 8
    assert sum(layer["abits"] for layer in blocks.values()) == 42  # 3.5 · 12 block layers
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["target_wbits"], summary["target_abits"], summary["widths"]) == (3.5, 3.5, [3, 6])
    config = json.loads((out / "config.json").read_text())["quant"]
    assert (config["wbits"], config["abits"]) == (4, 4)  # patch embedding and head: the target rounded up


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (("--widths", "3", "6"), ("--widths", "--mixed")),
        (
            ("--mixed", "--allocator", "paper", "--widths", "3", "6"),
            ("target=6 cannot be raised to 7", "widths=(3, 6)"),
        ),
        (("--mixed", "--allocator", "exact", "--widths", "4", "5"), ("target 6 bits", "allowed widths 4–5")),
        (("--mixed", "--allocator", "sensitivity", "--widths", "5", "9"), ("widths=(5, 9)",)),
        (("--min-wbits", "3"), ("--min-wbits", "--mixed")),
        (("--mixed", "--allocator", "paper", "--min-wbits", "3"), ("--min-wbits", "paper rule")),
        (("--mixed", "--allocator", "sensitivity", "--min-wbits", "8"), ("min_wbits=8", "above the widths 3–7")),
    ],
)
def test_widths_that_cannot_hold_the_plan_are_one_error(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], named: tuple[str, ...]
) -> None:
    out = workspace["root"] / "never_widths"
    args = quantize_args(workspace, *extra, "--relevance-images", "2", "--out", out)
    args[args.index("--wbits") + 1] = "6"
    status, _, err = run_cli(args, capsys)
    assert_one_error_line(status, err, *named)
    assert not out.exists()


def test_a_bit_plan_file_that_is_not_json_is_one_error(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    plan = workspace["root"] / "not_a_plan.json"
    plan.write_text("wbits: 4\n")
    status, _, err = run_cli(quantize_args(workspace, "--bit-plan", plan), capsys)
    assert_one_error_line(status, err, str(plan), "is not a bit plan")


def test_a_model_without_supported_attention_is_one_error(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    kwargs = {"num_classes": 2}
    convnet = timm.create_model("test_resnet", pretrained=False, **kwargs)
    weights = {key: value.contiguous() for key, value in convnet.state_dict().items()}
    save_file(weights, str(workspace["root"] / "convnet.safetensors"))
    card = json.loads(workspace["card"].read_text())
    card |= {"timm_name": "test_resnet", "kwargs": kwargs, "checkpoint": "convnet.safetensors"}
    (workspace["root"] / "convnet.json").write_text(json.dumps(card))
    out = workspace["root"] / "never_convnet"
    args = quantize_args(workspace, "--out", out)
    args[1] = workspace["root"] / "convnet.json"
    status, _, err = run_cli(args, capsys)
    assert_one_error_line(status, err, "ResNet has no supported attention")
    assert not out.exists()


# ---------------------------------------------------------------- outputs: nothing of the user's deleted, checked first


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command builds a model or loads calibration images: it had to stop before."""

    def fail(*_: object, **__: object) -> None:
        pytest.fail("the command did work before refusing its output path")

    for name in (
        "quantize_command.build_model",
        "quantize_command.calibration_images",
        "eval_command.build_model",
        "eval_command.load_run",
        "eval_command.evaluate",
        "relevance_command.build_model",
        "prune_command.build_model",
    ):
        monkeypatch.setattr(f"lrpq.cli.{name}", fail)


def hidden_entries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


@pytest.mark.parametrize(
    ("out", "reason"),
    [
        (".", "the current directory"),
        ("..", "a parent of the current directory"),
        ("HOME", "your home directory"),
        ("REPO", "a repository root"),
    ],
)
def test_out_holding_the_users_work_is_refused_with_overwrite(
    workspace: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_work: None,
    out: str,
    reason: str,
) -> None:
    cwd, home, repo = tmp_path / "work", tmp_path / "home", tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    for folder in (cwd, home, repo):
        folder.mkdir(exist_ok=True)
        (folder / "mine.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    out = {"HOME": str(home), "REPO": str(repo)}.get(out, out)
    status, _, err = run_cli(quantize_args(workspace, "--out", out, "--overwrite"), capsys)
    assert_one_error_line(status, err, out, reason)
    for folder in (tmp_path, cwd, home, repo):  # nothing deleted, nothing hidden left
        assert hidden_entries(folder) == ([".git"] if folder == repo else [])
    assert all((folder / "mine.txt").read_text() == "mine" for folder in (cwd, home, repo))


def test_overwrite_refuses_a_folder_that_is_not_a_run(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: None
) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"mine")
    status, _, err = run_cli(quantize_args(workspace, "--out", out, "--overwrite"), capsys)
    assert_one_error_line(status, err, str(out), "is not a run directory", "--overwrite only replaces")
    assert [path.name for path in out.iterdir()] == ["holiday.jpg"]
    assert [path.name for path in tmp_path.iterdir()] == ["photos"]


def test_out_that_is_a_file_fails_before_calibration(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: None
) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    status, _, err = run_cli(quantize_args(workspace, "--out", out, "--overwrite"), capsys)
    assert_one_error_line(status, err, str(out), "is an existing file")
    assert out.read_text() == "mine"
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_unwritable_out_fails_before_calibration(
    workspace: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_work: None,
) -> None:
    (tmp_path / "file").write_text("mine")
    status, _, err = run_cli(quantize_args(workspace, "--out", tmp_path / "file" / "run"), capsys)
    assert_one_error_line(status, err, "cannot write", "Not a directory")

    def read_only(*_: object, **__: object) -> None:  # what a read-only folder does, even to root
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr("lrpq.outputs.tempfile.mkdtemp", read_only)
    status, _, err = run_cli(quantize_args(workspace, "--out", tmp_path / "ro" / "a" / "run"), capsys)
    assert_one_error_line(status, err, "cannot write", "Permission denied")
    assert [path.name for path in tmp_path.iterdir()] == ["file"]  # ro/a made for the staging folder: removed


def test_interrupted_quantize_leaves_nothing(
    workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def ctrl_c(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("lrpq.cli.quantize_command.quantize", ctrl_c)
    status, _, err = run_cli(quantize_args(workspace, "--out", tmp_path / "runs" / "run"), capsys)
    assert status == 130
    assert err == "lrpq quantize: interrupted\n"
    assert list(tmp_path.iterdir()) == []  # neither the staging folder nor runs/


def test_overwrite_replaces_an_earlier_run(
    happy_path: dict[str, object], tmp_path: Path, workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run = Path(shutil.copytree(happy_path["run"], tmp_path / "run"))
    status, _, err = run_cli(quantize_args(workspace, "--seed", "1", "--out", run), capsys)
    assert_one_error_line(status, err, "already exists", "--overwrite")
    status, _, err = run_cli(quantize_args(workspace, "--seed", "1", "--out", run, "--overwrite"), capsys)
    assert status == 0, err
    assert json.loads((run / "summary.json").read_text())["seed"] == 1
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


def test_card_whose_input_size_the_model_rejects(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = json.loads(workspace["card"].read_text())
    card["data_config"] = {**DATA_CONFIG, "input_size": [3, 48, 48]}
    card["checkpoint"] = str(workspace["root"] / "tiny.safetensors")
    (tmp_path / "card48.json").write_text(json.dumps(card))
    args = quantize_args(workspace, "--out", tmp_path / "run")
    args[1] = tmp_path / "card48.json"
    status, _, err = run_cli(args, capsys)
    assert_one_error_line(status, err, "card48.json", "input_size 48×48 does not match kwargs img_size 32×32")
    assert [path.name for path in tmp_path.iterdir()] == ["card48.json"]


def edit_run_config(run: Path, section: str, key: str, value: object) -> None:
    payload = json.loads((run / "config.json").read_text())
    payload[section][key] = value
    (run / "config.json").write_text(json.dumps(payload))


def wrong_shape(run: Path) -> None:
    state = load_file(run / "model.safetensors")
    state["head.weight"] = torch.zeros(2, 47)
    save_file(state, str(run / "model.safetensors"))


RUN_DAMAGES = {
    "truncated model": (lambda run: (run / "model.safetensors").write_bytes(b"\x10"), "model.safetensors is damaged"),
    "empty model": (lambda run: (run / "model.safetensors").write_bytes(b""), "model.safetensors is damaged"),
    "garbage config": (lambda run: (run / "config.json").write_text("garbage"), "config.json is damaged"),
    "empty config": (lambda run: (run / "config.json").write_text("{}"), "config.json is damaged"),
    "wrong shape": (wrong_shape, "model.safetensors: head.weight is float32 (2, 47)"),
    "model deleted": (lambda run: (run / "model.safetensors").unlink(), "damaged run directory: model.safetensors"),
    "wbits edited": (lambda run: edit_run_config(run, "quant", "wbits", 3), "config.json gives quantizer"),
}


@pytest.mark.parametrize("damage", sorted(RUN_DAMAGES))
def test_eval_of_a_damaged_run_is_one_error_naming_the_file(
    happy_path: dict[str, object],
    workspace: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: str,
) -> None:
    change, message = RUN_DAMAGES[damage]
    run = Path(shutil.copytree(happy_path["run"], tmp_path / "run"))
    change(run)
    status, out, err = run_cli(["eval", run, "--data", workspace["data"], "--json", tmp_path / "r.json"], capsys)
    line = assert_one_error_line(status, err, message)
    assert "unknown model" not in line and "top-1" not in out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]  # no result, no staging file


def test_eval_json_is_checked_first_and_written_whole(
    happy_path: dict[str, object], workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = tmp_path / "result.json"
    result.write_text("previous result")
    status, _, err = run_cli(["eval", happy_path["run"], "--data", tmp_path / "absent", "--json", result], capsys)
    assert_one_error_line(status, err, "does not exist")
    assert result.read_text() == "previous result"  # a failed evaluation keeps the old file
    assert [path.name for path in tmp_path.iterdir()] == ["result.json"]
    status, _, err = run_cli(["eval", happy_path["run"], "--data", workspace["data"], "--json", result], capsys)
    assert status == 0, err
    assert json.loads(result.read_text())["n"] == 8
    assert [path.name for path in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.parametrize("json_path", ["folder", "under_a_file"])
def test_eval_json_that_cannot_be_written_fails_before_evaluating(
    happy_path: dict[str, object],
    workspace: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_work: None,
    json_path: str,
) -> None:
    (tmp_path / "file").write_text("mine")
    target = tmp_path if json_path == "folder" else tmp_path / "file" / "result.json"
    status, _, err = run_cli(["eval", happy_path["run"], "--data", workspace["data"], "--json", target], capsys)
    assert_one_error_line(status, err, str(target))
    assert [path.name for path in tmp_path.iterdir()] == ["file"]


@pytest.mark.parametrize("existing", ["file", "folder"])
def test_relevance_out_that_exists_fails_before_any_work(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: None, existing: str
) -> None:
    out = tmp_path / "report"
    if existing == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "mine.txt").write_text("mine")
    status, _, err = run_cli(["relevance", workspace["card"], "--data", workspace["data"], "--out", out], capsys)
    assert_one_error_line(status, err, str(out))
    assert [path.name for path in tmp_path.iterdir()] == ["report"]


# The final save of a quantize run made slow, so that a signal arrives while it writes (a partial file).
SLOW_SAVE = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # the parent may have started us with Ctrl-C ignored
import lrpq.runs
from lrpq.cli import main

save_packed = lrpq.runs.save_packed

def slow_save_packed(model, path):
    save_packed(model, path)
    path.write_bytes(path.read_bytes()[:100])
    print("saving", flush=True)
    time.sleep(120)

lrpq.runs.save_packed = slow_save_packed
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("signum", "status", "line"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_during_the_final_save_keeps_the_old_run_and_leaves_nothing(
    workspace: dict[str, Path], tmp_path: Path, signum: int, status: int, line: str
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"model": {}, "quant": {}}')
    (out / "model.safetensors").write_bytes(b"the old run")
    argv = [str(arg) for arg in quantize_args(workspace, "--out", out, "--overwrite")]
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"},
    )
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    try:
        assert process.stdout.readline() == "saving\n"
        assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".run.")]  # staging, mid-save
        process.send_signal(signum)
        _, stderr = process.communicate()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == f"lrpq quantize: {line}"
    assert [path.name for path in tmp_path.iterdir()] == ["run"]  # no hidden staging folder
    assert sorted(path.name for path in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"the old run"
