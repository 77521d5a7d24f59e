"""COCO result writing and scoring with pycocotools only, so it runs (and is tested) without mmdet.

The conventions follow mmdet 3.x ``CocoMetric`` so that numbers produced here are comparable with
published mmdet numbers: boxes are written as ``[x, y, w, h]`` floats, masks as compressed RLE with
``counts`` as ``str``, and mask AP is scored without the ``bbox`` key so that pycocotools takes the
instance area from the mask rather than the box (which changes APs/APm/APl).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lrpq.errors import LrpqError

IouType = Literal["bbox", "segm"]
IOU_TYPES: tuple[IouType, ...] = ("bbox", "segm")
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class CocoError(LrpqError):
    """Bad COCO input: annotation file, image folder, detections or result file."""


def _as_numpy(values: npt.ArrayLike, dtype: type | None = None) -> np.ndarray:
    """Accept numpy arrays, torch tensors (any device) and lists alike, without importing torch."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def _encode_masks(masks: npt.ArrayLike) -> list[dict[str, Any]]:
    """Binary masks (N, H, W) → compressed RLEs, ``counts`` decoded so the result is JSON-serialisable."""
    array = _as_numpy(masks)
    if array.ndim != 3:
        raise CocoError(f"masks have shape {array.shape}; expected (N, H, W) binary masks")
    if len(array) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(array.transpose(1, 2, 0).astype(np.uint8)))
    return [_normalise_rle(rle) for rle in rles]


def _normalise_rle(rle: Mapping[str, Any]) -> dict[str, Any]:
    if "counts" not in rle or "size" not in rle:
        raise CocoError(f"mask {dict(rle)!r} is not a compressed RLE with 'size' and 'counts'")
    counts = rle["counts"]
    text = counts.decode() if isinstance(counts, bytes) else counts
    return {"size": [int(s) for s in rle["size"]], "counts": text}


def detections_to_coco_results(
    image_id: int,
    boxes_xyxy: npt.ArrayLike,
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    masks: npt.ArrayLike | Sequence[Mapping[str, Any]] | None,
    cat_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """One image's detections → COCO result dicts.

    ``labels`` are contiguous class indices (as detectors output them) mapped to COCO category ids
    through ``cat_ids``. ``masks`` is either binary masks (N, H, W) or already-encoded RLEs, or
    ``None`` for box-only detectors.
    """
    boxes = _as_numpy(boxes_xyxy, np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise CocoError(f"image {image_id}: boxes have shape {boxes.shape}; expected (N, 4) x1, y1, x2, y2")
    score_values = _as_numpy(scores, np.float64).reshape(-1)
    label_values = _as_numpy(labels, np.int64).reshape(-1)
    count = len(boxes)
    if len(score_values) != count or len(label_values) != count:
        raise CocoError(
            f"image {image_id}: {count} boxes but {len(score_values)} scores and {len(label_values)} labels"
        )
    bad = label_values[(label_values < 0) | (label_values >= len(cat_ids))]
    if len(bad):
        raise CocoError(f"image {image_id}: label {int(bad[0])} is outside the {len(cat_ids)} categories")
    rles = None
    if masks is not None:
        is_rle_list = isinstance(masks, Sequence) and all(isinstance(m, Mapping) for m in masks)
        rles = [_normalise_rle(m) for m in masks] if is_rle_list else _encode_masks(masks)
        if len(rles) != count:
            raise CocoError(f"image {image_id}: {len(rles)} masks for {count} boxes")
    results = []
    for i in range(count):
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        result: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": int(cat_ids[label_values[i]]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(score_values[i]),
        }
        if rles is not None:
            result["segmentation"] = rles[i]
        results.append(result)
    return results


def write_json(data: Any, path: str | Path) -> Path:
    """Write JSON via a temporary file and a rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened with "x" (not mkstemp, whose 0600 mode would survive the rename).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_results(results: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write COCO result dicts as the JSON list that ``coco_ap`` and the COCO server read."""
    return write_json(list(results), path)


def load_ground_truth(ann_file: str | Path | COCO) -> COCO:
    """Load an instances annotation file without pycocotools' progress prints (a COCO passes through)."""
    if isinstance(ann_file, COCO):
        return ann_file
    ann_path = Path(ann_file)
    if not ann_path.is_file():
        raise CocoError(f"annotation file not found: {ann_path}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_path))
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise CocoError(f"annotation file {ann_path} is not COCO instances JSON ({exc})") from None


def check_images(ann_file: str | Path | COCO, img_dir: str | Path) -> dict[int, Path]:
    """Image id → file for every annotated image, in id order; fail early if any file is missing."""
    gt = load_ground_truth(ann_file)
    folder = Path(img_dir)
    if not folder.is_dir():
        raise CocoError(f"image folder not found: {folder}")
    paths = {img_id: folder / gt.imgs[img_id]["file_name"] for img_id in sorted(gt.getImgIds())}
    missing = [img_id for img_id, path in paths.items() if not path.is_file()]
    if missing:
        raise CocoError(
            f"{len(missing)} annotated image(s) missing from {folder}, e.g. id {missing[0]} ({paths[missing[0]].name})"
        )
    return paths


def _load_results(results: Sequence[Mapping[str, Any]] | str | Path) -> list[dict[str, Any]]:
    if isinstance(results, str | Path):
        path = Path(results)
        if not path.is_file():
            raise CocoError(f"results file not found: {path}")
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CocoError(f"results file {path} is not JSON ({exc.msg})") from None
        if not isinstance(results, list):
            raise CocoError(f"results file {path} must hold a JSON list of detections")
    return [dict(r) for r in results]


def _check_results(gt: COCO, results: Sequence[Mapping[str, Any]], iou_type: IouType) -> None:
    """Turn pycocotools' bare asserts and KeyErrors into errors that name the bad detection."""
    needed = ("image_id", "category_id", "score", iou_type if iou_type == "bbox" else "segmentation")
    for index, result in enumerate(results):
        absent = [key for key in needed if key not in result]
        if absent:
            raise CocoError(f"result {index} lacks {', '.join(absent)} needed for {iou_type} AP")
        if result["image_id"] not in gt.imgs:
            raise CocoError(f"result {index}: image id {result['image_id']} is not in the annotations")
        if result["category_id"] not in gt.cats:
            raise CocoError(f"result {index}: category id {result['category_id']} is not in the annotations")


def _score(
    gt: COCO, results: list[dict[str, Any]], iou_type: IouType, img_ids: Sequence[int] | None
) -> dict[str, float]:
    if iou_type not in IOU_TYPES:
        raise CocoError(f"iou_type={iou_type!r}; use one of {', '.join(IOU_TYPES)}")
    _check_results(gt, results, iou_type)
    unknown = sorted(set(img_ids or ()) - set(gt.imgs))
    if unknown:
        raise CocoError(f"img_ids include {unknown[0]}, absent from the annotations")
    dropped = "segmentation" if iou_type == "bbox" else "bbox"
    # Fresh dicts: loadRes writes area/id/iscrowd into the entries it is given.
    detections = [{k: v for k, v in r.items() if k != dropped} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        if detections:
            dt = gt.loadRes(detections)
        else:  # loadRes cannot take an empty list; an empty result set scores 0 (or -1), not an error
            dt = COCO()
            dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"])}
            dt.dataset["annotations"] = []
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iou_type)
        if img_ids is not None:
            evaluator.params.imgIds = sorted(set(img_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats[:6], strict=True)}


def coco_ap(
    ann_file: str | Path | COCO,
    results: Sequence[Mapping[str, Any]] | str | Path,
    iou_type: IouType,
    img_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """COCOeval's AP, AP50, AP75, APs, APm, APl in [0, 1] (-1 where an area range has no objects).

    ``img_ids`` restricts scoring to a subset (e.g. the images actually run with ``--limit``);
    otherwise unrun images would count as misses.
    """
    return _score(load_ground_truth(ann_file), _load_results(results), iou_type, img_ids)


def evaluate_detections(
    ann_file: str | Path | COCO,
    results: Sequence[Mapping[str, Any]] | str | Path,
    iou_types: Sequence[IouType] = IOU_TYPES,
    img_ids: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
    """Box and mask AP from one combined result list, loading annotations and results once."""
    gt = load_ground_truth(ann_file)
    loaded = _load_results(results)
    return {iou_type: _score(gt, loaded, iou_type, img_ids) for iou_type in iou_types}
