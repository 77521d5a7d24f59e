"""mmdet glue (eval/coco/mmdet_adapter.py) and the COCO CLI.

The first half runs everywhere: the adapter must import without mmdet, lrpq must never import it,
and the pure pieces (name translation, plans, the WindowMSA factory's reuse of lrpq's window
attention) are checked on timm's Swin. The second half needs a working mmdet (mmcv with compiled
ops) and is skipped otherwise; it builds a randomly initialised Swin-T Mask R-CNN from mmdet's own
config, so no checkpoint download is needed.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch
from lrpq_eval.coco import mmdet_adapter as adapter
from lrpq_eval.coco.metric import METRIC_NAMES, CocoError
from timm.models.swin_transformer import WindowAttention

from lrpq.api import prepare, quant_layers, set_mode
from lrpq.config import BitPlan, LayerBits, QuantConfig
from lrpq.modules import QuantMatMul
from lrpq.quantizers import QuantMode
from lrpq.relevance import LayerScores

REPO = Path(__file__).resolve().parents[1]
COCO_TINY = REPO.parent / "shared" / "data" / "coco_tiny"
ANN_FILE = COCO_TINY / "annotations" / "instances_val2017.json"
MM_PACKAGES = ("mmdet", "mmcv", "mmengine")


@functools.cache
def _timm_swin_layer_names() -> tuple[str, ...]:
    """Every quantization point lrpq gives timm's Swin-T (Linear, Conv2d and attention matmuls)."""
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    return tuple(quant_layers(prepare(model, QuantConfig())))


def test_adapter_imports_without_mmdet() -> None:
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {MM_PACKAGES!r}:\n"
        "            raise ImportError(f'blocked {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import lrpq_eval.coco.mmdet_adapter as adapter\n"
        f"assert not [m for m in sys.modules if m.split('.')[0] in {MM_PACKAGES!r}]\n"
        "try:\n"
        "    adapter.register_mmdet_swin()\n"
        "except adapter.CocoError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(adapter.MMDET_UNAVAILABLE) and "blocked mmdet" in done.stdout


def test_lrpq_never_imports_mmdet() -> None:
    offenders = []
    for path in sorted((REPO / "lrpq").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} {m}" for m in modules if m.split(".")[0] in MM_PACKAGES]
    assert offenders == []


def test_timm_names_translate_to_mmdet_backbone_names() -> None:
    assert adapter.timm_to_mmdet_name("patch_embed.proj") == "backbone.patch_embed.projection"
    assert (
        adapter.timm_to_mmdet_name("layers.2.blocks.5.attn.matmul2") == "backbone.stages.2.blocks.5.attn.w_msa.matmul2"
    )
    assert adapter.timm_to_mmdet_name("layers.0.blocks.1.mlp.fc1") == "backbone.stages.0.blocks.1.ffn.layers.0.0"
    assert adapter.timm_to_mmdet_name("layers.3.blocks.0.mlp.fc2") == "backbone.stages.3.blocks.0.ffn.layers.1"
    assert adapter.timm_to_mmdet_name("layers.1.downsample.reduction") == "backbone.stages.0.downsample.reduction"
    assert adapter.timm_to_mmdet_name("head.fc") is None
    names = _timm_swin_layer_names()
    translated = {name: adapter.timm_to_mmdet_name(name) for name in names}
    assert [name for name, target in translated.items() if target is None] == ["head.fc"]
    targets = [target for target in translated.values() if target is not None]
    assert len(set(targets)) == len(targets) == len(names) - 1  # one-to-one


def test_detector_plan_translates_keeps_and_drops() -> None:
    plan = BitPlan(
        {
            "layers.0.blocks.0.attn.qkv": LayerBits(5, 6),
            "backbone.stages.3.blocks.1.ffn.layers.1": LayerBits(3, 4),
            "head.fc": LayerBits(8, 8),
        }
    )
    assert adapter.detector_plan(plan).layers == {
        "backbone.stages.0.blocks.0.attn.w_msa.qkv": LayerBits(5, 6),
        "backbone.stages.3.blocks.1.ffn.layers.1": LayerBits(3, 4),
    }


def test_plan_from_scores_keeps_the_budget(tmp_path: Path) -> None:
    names = [name for name in _timm_swin_layer_names() if name.startswith("layers.")]
    block_of = {name: name.rsplit(".", 2)[0] if ".blocks." in name else name.rsplit(".", 1)[0] for name in names}
    scores = LayerScores(
        scores={name: float(index % 7 + 1) for index, name in enumerate(names)},
        block_of=block_of,
        block_order=list(dict.fromkeys(block_of.values())),
        num_images=1,
    )
    path = tmp_path / "scores.json"
    scores.save(path)
    plan = adapter.plan_from_scores(LayerScores.load(path), wbits=4, abits=4)
    assert list(plan.layers) == names
    assert plan.mean_bits("abits") == 4.0 and plan.mean_bits("wbits") == 4.0
    assert {bits.abits for bits in plan.layers.values()} == {3, 4, 5}  # mixed, not uniform
    # The paper rule raises the first two Swin blocks by one bit.
    assert all(plan.layers[n].abits == 5 for n in names if n.startswith(("layers.0.blocks.0.", "layers.0.blocks.1.")))


def test_window_msa_factory_reuses_lrpq_window_attention() -> None:
    """The factory only reads WindowMSA attributes that timm's WindowAttention shares, so timm's
    class checks the wiring; with quantizers OFF the replacement computes the float function."""
    torch.manual_seed(0)
    attn = WindowAttention(dim=32, num_heads=4, window_size=(4, 4)).eval()
    torch.nn.init.normal_(attn.relative_position_bias_table, std=0.5)
    quantized = adapter.quantize_window_msa(attn, "blocks.0.attn", QuantConfig(wbits=8, abits=8)).eval()
    assert isinstance(quantized.matmul1, QuantMatMul) and isinstance(quantized.matmul2, QuantMatMul)
    assert quantized.qkv is attn.qkv and quantized.relative_position_bias_table is attn.relative_position_bias_table
    set_mode(quantized, QuantMode.OFF)
    x = torch.randn(6, 16, 32)
    mask = torch.zeros(3, 16, 16).masked_fill(torch.rand(3, 16, 16) > 0.7, -100.0)
    with torch.no_grad():
        torch.testing.assert_close(quantized(x), attn(x))
        torch.testing.assert_close(quantized(x, mask=mask), attn(x, mask=mask))


def test_region_rules() -> None:
    block = torch.nn.Module()
    assert adapter.swin_block_regions(block) == [("norm1", "attn.w_msa.qkv"), ("norm2", "ffn.layers.0.0")]
    block.norm = None
    assert adapter.patch_merging_regions(block) == []
    block.norm = torch.nn.LayerNorm(8)
    assert adapter.patch_merging_regions(block) == [("norm", "reduction")]


@pytest.mark.skipif(not ANN_FILE.is_file(), reason=f"shared COCO subset absent: {ANN_FILE}")
def test_category_ids_match_names_with_spaces_or_underscores() -> None:
    gt = adapter.load_ground_truth(ANN_FILE)
    assert adapter.category_ids(gt, ["person", "traffic_light", "traffic light", "toothbrush"]) == [1, 10, 10, 90]
    with pytest.raises(CocoError, match="detector class 'unicorn' is not a category"):
        adapter.category_ids(gt, ["person", "unicorn"])


@functools.cache
def _coco_eval_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("coco_eval", REPO / "scripts" / "coco_eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``scripts/coco_eval.py``'s status and stderr, run in-process (a subprocess spends ~7 s importing torch)."""
    capsys.readouterr()
    try:
        status = _coco_eval_script().main(list(args))
    except SystemExit as exit_:  # usage errors leave through argparse
        status = exit_.code
    return status, capsys.readouterr().err


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, checkpoint = tmp_path / "model.py", tmp_path / "model.pth"
    config.write_text("")
    checkpoint.write_bytes(b"")
    common = ["--config", str(config), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out.json")]
    status, err = _run_cli(capsys, *common, "--data-root", str(tmp_path), "--ann-file", str(tmp_path / "missing.json"))
    assert status == 2
    assert err.strip().splitlines() == [f"error: annotation file not found: {tmp_path / 'missing.json'}"]
    status, err = _run_cli(capsys, *common, "--data-root", str(tmp_path), "--mixed")
    assert status == 2
    assert err.strip().splitlines() == ["error: --mixed needs --bit-plan FILE or --scores FILE"]
    assert not (tmp_path / "out.json").exists()


# ---------------------------------------------------------------------------------------------------
# With mmdet (mmcv built with its compiled ops).


@pytest.fixture(scope="module")
def mmdet_config() -> Path:
    try:
        import mmdet
        import mmdet.apis
    except (ImportError, AssertionError) as exc:  # AssertionError: mmdet's mmcv version check
        pytest.skip(f"{adapter.MMDET_UNAVAILABLE} ({exc})")
    return Path(mmdet.__file__).parent / ".mim" / "configs" / "swin" / "mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py"


def test_mmdet_window_msa_factory_matches_float(mmdet_config: Path) -> None:
    from mmdet.models.backbones.swin import WindowMSA

    torch.manual_seed(0)
    msa = WindowMSA(embed_dims=32, num_heads=4, window_size=(7, 7)).eval()
    torch.nn.init.normal_(msa.relative_position_bias_table, std=0.5)
    quantized = adapter.quantize_window_msa(msa, "attn", QuantConfig()).eval()
    set_mode(quantized, QuantMode.OFF)
    x = torch.randn(8, 49, 32)
    mask = torch.zeros(4, 49, 49).masked_fill(torch.rand(4, 49, 49) > 0.7, -100.0)
    with torch.no_grad():
        torch.testing.assert_close(quantized(x, mask=mask), msa(x, mask=mask))


def test_mmdet_regions_and_plan_names(mmdet_config: Path) -> None:
    from lrpq.regions import find_regions

    detector = adapter.build_detector(mmdet_config, None)
    adapter.register_mmdet_swin()
    regions = find_regions(detector)
    assert len(regions) == 2 * 12 + 3  # Swin-T: 12 blocks, 3 patch mergings
    assert regions[0].norm == "backbone.stages.0.blocks.0.norm1"
    assert regions[0].sink == "backbone.stages.0.blocks.0.attn.w_msa.qkv"
    assert adapter.unwrap_mmcv_layers(detector) > 0
    names = set(quant_layers(prepare(detector, QuantConfig())))
    translated = {adapter.timm_to_mmdet_name(n) for n in _timm_swin_layer_names()} - {None}
    assert translated <= names
    assert any(not n.startswith("backbone.") for n in names)  # neck and heads are quantized too


@pytest.mark.skipif(not ANN_FILE.is_file(), reason=f"shared COCO subset absent: {ANN_FILE}")
def test_mmdet_quantize_and_evaluate_end_to_end(mmdet_config: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    detector = adapter.build_detector(mmdet_config, None)
    for step in detector.cfg.test_dataloader.dataset.pipeline:
        if step["type"] == "Resize":
            step["scale"] = (448, 448)  # keeps the CPU test short; 1333x800 works the same way
    paths = list(adapter.check_images(ANN_FILE, COCO_TINY / "val2017").values())
    calib = adapter.calibration_images(detector, paths, n=1)
    adapter.quantize_detector(detector, QuantConfig(wbits=8, abits=8), calib, progress=False)
    metrics = adapter.run_coco_eval(detector, ANN_FILE, COCO_TINY / "val2017", tmp_path / "r.json", limit=2)
    assert set(metrics) == {"bbox", "segm"}
    for stats in metrics.values():
        assert set(stats) == set(METRIC_NAMES) and all(-1.0 <= v <= 1.0 for v in stats.values())
    results = json.loads((tmp_path / "r.json").read_text())
    assert {r["image_id"] for r in results} <= set(sorted(adapter.load_ground_truth(ANN_FILE).getImgIds())[:2])
