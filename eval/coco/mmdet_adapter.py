"""Quantize mmdet 3.x Swin detectors (Mask R-CNN, Cascade Mask R-CNN) with lrpq and score them on COCO.

Thin glue only: lrpq does the quantization, pycocotools (``metric.py``) the scoring. mmdet and mmcv
are imported inside the functions that need them, so this module imports (and its pure helpers
work) on machines without them. lrpq itself never imports mmdet; it learns mmdet's Swin through its
public registries (``register_attention``, ``register_regions``).

Like RepQ-ViT's detection code, every Conv2d and Linear of the detector (backbone, FPN, RPN and RoI
heads) is quantized, calibrated on one image by default, and the reparameterization acts on the
backbone's LayerNorm → Linear regions.

Verified against the mmdet 3.3.0 / mmcv 2.1.0 sources (attribute names, FFN layout, test_step);
the end-to-end path has run only where mmcv's compiled ops were available (see docs/coco.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO
from torch import nn
from tqdm.auto import tqdm

from lrpq.allocation.from_relevance import allocate_from_scores
from lrpq.api import quantize
from lrpq.config import BitPlan, QuantConfig
from lrpq.modules import QuantWindowAttention, register_attention
from lrpq.regions import register_regions
from lrpq.relevance import LayerScores

from .metric import (
    CocoError,
    check_images,
    detections_to_coco_results,
    evaluate_detections,
    load_ground_truth,
    write_results,
)

MMDET_UNAVAILABLE = "mmdet/mmcv unavailable: mmcv 2.x does not build against torch 2.14 (C++20 headers)"
BACKBONE_PREFIX = "backbone."

# lrpq's timm Swin names → mmdet's SwinTransformer names. Relevance needs class logits, so it is
# computed on the ImageNet classifier (timm) and its plan is carried over to the detector's backbone.
# timm puts each PatchMerging at the start of the next stage, mmdet at the end of the previous one.
_TIMM_TO_MMDET: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"patch_embed\.proj"), "patch_embed.projection"),
    (
        re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.(qkv|proj|matmul1|matmul2)"),
        r"stages.\1.blocks.\2.attn.w_msa.\3",
    ),
    (re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1"), r"stages.\1.blocks.\2.ffn.layers.0.0"),
    (re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2"), r"stages.\1.blocks.\2.ffn.layers.1"),
)
_TIMM_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.reduction")


def _mmdet_missing(exc: ImportError) -> CocoError:
    return CocoError(f"{MMDET_UNAVAILABLE} ({exc}); see docs/coco.md for a working environment")


class _WindowMSAAsTimm:
    """mmdet's ``WindowMSA`` seen through timm's attribute names.

    Its forward is timm's ``WindowAttention`` forward line for line (scaled q·kᵀ, relative position
    bias from its own table and index, shift mask, softmax, ·v, proj), so lrpq's
    ``QuantWindowAttention`` is reused instead of copied; only timm's ``window_area`` is missing.
    """

    def __init__(self, msa: nn.Module) -> None:
        self._msa = msa
        self.window_area = msa.window_size[0] * msa.window_size[1]

    def __getattr__(self, key: str) -> Any:
        return getattr(self._msa, key)


def quantize_window_msa(module: nn.Module, name: str, config: QuantConfig) -> nn.Module:
    """``register_attention`` factory for mmdet's ``WindowMSA``: explicit ``matmul1``/``matmul2``."""
    return QuantWindowAttention(_WindowMSAAsTimm(module), name, config)


def swin_block_regions(block: nn.Module) -> list[tuple[str, str]]:
    """Regions of mmdet's ``SwinBlock`` (mmcv ``FFN``: ``layers[0][0]`` is fc1).

    Unlike lrpq's timm rule, norm1 is folded even though mmdet pads windows with zeros after norm1
    (detection inputs are rarely window multiples): the folded qkv bias changes what those padded
    tokens contribute. RepQ-ViT's published detection numbers fold it the same way.
    """
    return [("norm1", "attn.w_msa.qkv"), ("norm2", "ffn.layers.0.0")]


def patch_merging_regions(block: nn.Module) -> list[tuple[str, str]]:
    """mmdet's ``PatchMerging`` pads before its norm, so norm → reduction folds exactly."""
    return [("norm", "reduction")] if block.norm is not None else []


def register_mmdet_swin() -> None:
    """Teach lrpq mmdet's Swin attention and LayerNorm regions (idempotent)."""
    try:
        from mmdet.models.backbones.swin import SwinBlock, WindowMSA
        from mmdet.models.layers import PatchMerging
    except ImportError as exc:
        raise _mmdet_missing(exc) from None
    register_attention(WindowMSA, quantize_window_msa)
    register_regions(SwinBlock, swin_block_regions)
    register_regions(PatchMerging, patch_merging_regions)


def unwrap_mmcv_layers(model: nn.Module) -> int:
    """Turn mmcv's ``Linear``/``Conv2d`` wrappers into plain torch layers, in place; return how many.

    mmcv's FFN and mask heads build these subclasses, which differ from torch's only for empty
    inputs on torch < 1.6. lrpq quantizes exact ``nn.Linear``/``nn.Conv2d`` types, so without this
    Swin's fc1/fc2 would stay float and the norm2 → fc1 fold would find no input quantizer.
    """
    from mmcv.cnn.bricks.wrappers import Conv2d, Linear

    count = 0
    for module in model.modules():
        for wrapper, plain in ((Linear, nn.Linear), (Conv2d, nn.Conv2d)):
            if type(module) is wrapper:
                module.__class__ = plain  # same parameters and buffers; only forward differs
                count += 1
    return count


def timm_to_mmdet_name(name: str, prefix: str = BACKBONE_PREFIX) -> str | None:
    """The detector's name for a timm Swin quantization point, or None (e.g. the classifier head)."""
    for pattern, replacement in _TIMM_TO_MMDET:
        if pattern.fullmatch(name):
            return prefix + pattern.sub(replacement, name)
    downsample = _TIMM_DOWNSAMPLE.fullmatch(name)
    if downsample:
        return f"{prefix}stages.{int(downsample.group(1)) - 1}.downsample.reduction"
    return None


def detector_plan(plan: BitPlan, prefix: str = BACKBONE_PREFIX) -> BitPlan:
    """A plan for the detector: timm Swin names are translated, detector names kept, head dropped."""
    layers = {}
    for name, bits in plan.layers.items():
        target = name if name.startswith(prefix) else timm_to_mmdet_name(name, prefix)
        if target is not None:
            layers[target] = bits
    return BitPlan(layers)


def plan_from_scores(scores: LayerScores, wbits: int, abits: int) -> BitPlan:
    """LRP-QViT allocation from the layer scores of the timm Swin classifier, in timm names.

    Every scored layer but the attention products (``matmul1``/``matmul2``, lrpq's names for the
    two weightless points) has weights.
    """
    weight_layers = [name for name in scores.scores if not name.endswith((".matmul1", ".matmul2"))]
    return allocate_from_scores(scores, weight_layers, wbits=wbits, abits=abits)


def build_detector(config_path: str | Path, checkpoint_path: str | Path | None, device: str = "cpu") -> nn.Module:
    """The float detector through ``mmdet.apis.init_detector`` (``None`` checkpoint: random weights)."""
    for what, path in (("config", config_path), ("checkpoint", checkpoint_path)):
        if path is not None and not Path(path).is_file():
            raise CocoError(f"{what} file not found: {path}")
    try:
        from mmdet.apis import init_detector
    except ImportError as exc:
        raise _mmdet_missing(exc) from None
    checkpoint = None if checkpoint_path is None else str(checkpoint_path)
    return init_detector(str(config_path), checkpoint, device=device).eval()


def _test_pipeline(detector: nn.Module) -> Any:
    """The config's test pipeline without LoadAnnotations (as mmdet's DetInferencer): images only."""
    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg

    steps = get_test_pipeline_cfg(detector.cfg)
    return Compose([step for step in steps if step["type"] not in ("LoadAnnotations", "mmdet.LoadAnnotations")])


def _batch(pipeline: Any, path: Path, image_id: int) -> dict[str, list[Any]]:
    """One image as ``test_step`` takes it: lists of inputs and data samples (batch of one)."""
    data = pipeline({"img_path": str(path), "img_id": image_id})
    return {"inputs": [data["inputs"]], "data_samples": [data["data_samples"]]}


def calibration_images(detector: nn.Module, image_paths: Sequence[str | Path], n: int = 1) -> list[dict]:
    """The first ``n`` images through the detector's own test pipeline (resize, pad, normalise)."""
    if n < 1 or n > len(image_paths):
        raise CocoError(f"calibration size {n} is not within 1..{len(image_paths)} available images")
    pipeline = _test_pipeline(detector)
    return [_batch(pipeline, Path(path), index) for index, path in enumerate(image_paths[:n])]


def _test_step(detector: nn.Module, batch: dict) -> list[Any]:
    return detector.test_step(batch)


def quantize_detector(
    detector: nn.Module, quant_config: QuantConfig, calib_batch: Sequence[dict], progress: bool = True
) -> nn.Module:
    """Quantize the whole detector in place with ``lrpq.api.quantize``, calibrating via ``test_step``."""
    register_mmdet_swin()
    unwrap_mmcv_layers(detector)
    return quantize(detector, quant_config, calib_batch, run=_test_step, progress=progress)


def category_ids(gt: COCO, classes: Sequence[str]) -> list[int]:
    """COCO category id of each detector class index, matched by name as mmdet's CocoMetric does.

    Underscores count as spaces: mmdet's fallback class list (checkpoints without metadata) spells
    ``traffic_light`` where the annotations say ``traffic light``.
    """
    by_name = {cat["name"].replace("_", " "): cat_id for cat_id, cat in gt.cats.items()}
    missing = [name for name in classes if name.replace("_", " ") not in by_name]
    if missing:
        raise CocoError(f"detector class {missing[0]!r} is not a category of the annotation file")
    return [by_name[name.replace("_", " ")] for name in classes]


def run_coco_eval(
    detector: nn.Module,
    ann_file: str | Path,
    img_dir: str | Path,
    results_path: str | Path,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Detect every annotated image (the first ``limit`` by id), write COCO results, return box/mask AP."""
    gt = load_ground_truth(ann_file)
    paths = check_images(gt, img_dir)
    image_ids = list(paths)[:limit]
    cat_ids = category_ids(gt, detector.dataset_meta["classes"])
    pipeline = _test_pipeline(detector)
    results: list[dict[str, Any]] = []
    with_masks = False
    for image_id in tqdm(image_ids, desc="COCO inference", disable=not progress):
        pred = _test_step(detector, _batch(pipeline, paths[image_id], image_id))[0].pred_instances
        masks = pred.masks if "masks" in pred else None
        with_masks = with_masks or masks is not None
        results += detections_to_coco_results(image_id, pred.bboxes, pred.scores, pred.labels, masks, cat_ids)
    write_results(results, results_path)
    iou_types = ("bbox", "segm") if with_masks else ("bbox",)
    return evaluate_detections(gt, results, iou_types, img_ids=image_ids)
