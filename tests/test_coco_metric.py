"""COCO result writing and scoring (eval/coco/metric.py) on the real coco_tiny annotations."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lrpq_eval.coco.metric import (
    METRIC_NAMES,
    CocoError,
    check_images,
    coco_ap,
    detections_to_coco_results,
    evaluate_detections,
    write_results,
)
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lrpq.errors import LrpqError

COCO_TINY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_tiny"
ANN_FILE = COCO_TINY / "annotations" / "instances_val2017.json"
IMG_DIR = COCO_TINY / "val2017"
needs_coco_tiny = pytest.mark.skipif(not ANN_FILE.is_file(), reason=f"shared COCO subset absent: {ANN_FILE}")
# pycocotools' annToMask trips a numpy 2 copy-keyword DeprecationWarning on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def gt() -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ANN_FILE))


def _ground_truth_as_detections(gt: COCO, shift: float = 0.0) -> list[dict[str, Any]]:
    """Every non-crowd object as a detector would report it, through detections_to_coco_results.

    Labels are contiguous indices into the sorted category ids, as detectors emit them. ``shift``
    moves every box and mask right by that fraction of the box width; then, deterministically, every
    fifth object is dropped and every third gets score 0.5, so ranking and recall both matter.
    """
    cat_ids = sorted(gt.getCatIds())
    label_of = {cat_id: i for i, cat_id in enumerate(cat_ids)}
    results = []
    for image_id in sorted(gt.getImgIds()):
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id, iscrowd=False))]
        anns.sort(key=lambda a: a["id"])
        boxes, scores, labels, masks = [], [], [], []
        for index, ann in enumerate(anns):
            if shift and index % 5 == 4:
                continue
            x, y, w, h = ann["bbox"]
            dx = shift * w
            boxes.append([x + dx, y, x + dx + w, y + h])
            scores.append(0.5 if shift and index % 3 == 0 else 1.0)
            labels.append(label_of[ann["category_id"]])
            masks.append(np.roll(gt.annToMask(ann), round(dx), axis=1))
        height, width = gt.imgs[image_id]["height"], gt.imgs[image_id]["width"]
        mask_array = np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)
        results += detections_to_coco_results(image_id, np.array(boxes), scores, labels, mask_array, cat_ids)
    return results


@pytest.fixture(scope="module")
def perfect(gt: COCO) -> list[dict[str, Any]]:
    return _ground_truth_as_detections(gt)


@pytest.fixture(scope="module")
def perturbed(gt: COCO) -> list[dict[str, Any]]:
    return _ground_truth_as_detections(gt, shift=0.1)


def _reference_stats(gt: COCO, results: list[dict[str, Any]], iou_type: str) -> dict[str, float]:
    """COCOeval run directly, as mmdet's CocoMetric does (segm scored without the bbox key)."""
    drop = "bbox" if iou_type == "segm" else "segmentation"
    detections = [{k: v for k, v in r.items() if k != drop} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(detections), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(METRIC_NAMES, (float(s) for s in evaluator.stats[:6]), strict=True))


def test_detections_to_coco_results_converts_boxes_labels_and_masks() -> None:
    mask = np.zeros((1, 6, 8), dtype=bool)
    mask[0, 1:4, 2:7] = True
    results = detections_to_coco_results(7, np.array([[2.0, 1.0, 7.0, 4.0]]), [0.25], [1], mask, [3, 9])
    assert len(results) == 1
    result = results[0]
    assert result["image_id"] == 7 and result["category_id"] == 9 and result["score"] == 0.25
    assert result["bbox"] == [2.0, 1.0, 5.0, 3.0]
    assert isinstance(result["segmentation"]["counts"], str)
    assert result["segmentation"]["size"] == [6, 8]
    rle = {"size": result["segmentation"]["size"], "counts": result["segmentation"]["counts"].encode()}
    assert np.array_equal(mask_utils.decode(rle).astype(bool), mask[0])
    json.dumps(results)  # JSON-serialisable as written


def test_detections_to_coco_results_accepts_rles_and_no_masks() -> None:
    rle = mask_utils.encode(np.asfortranarray(np.ones((4, 4, 1), dtype=np.uint8)))[0]
    with_rle = detections_to_coco_results(1, [[0, 0, 4, 4]], [0.9], [0], [rle], [5])
    assert with_rle[0]["segmentation"]["counts"] == rle["counts"].decode()
    boxes_only = detections_to_coco_results(1, [[0, 0, 4, 4]], [0.9], [0], None, [5])
    assert "segmentation" not in boxes_only[0]
    assert detections_to_coco_results(1, np.zeros((0, 4)), [], [], np.zeros((0, 4, 4)), [5]) == []


@pytest.mark.parametrize(
    ("boxes", "scores", "labels", "masks", "message"),
    [
        ([[0, 0, 1, 1]], [0.5, 0.4], [0], None, "1 boxes but 2 scores"),
        ([[0, 0, 1, 1]], [0.5], [2], None, "label 2 is outside the 2 categories"),
        ([[0, 0, 1]], [0.5], [0], None, "boxes have shape"),
        ([[0, 0, 1, 1]], [0.5], [0], np.zeros((2, 3, 3)), "2 masks for 1 boxes"),
        ([[0, 0, 1, 1]], [0.5], [0], [{"size": [3, 3]}], "not a compressed RLE"),
    ],
)
def test_detections_to_coco_results_rejects_inconsistent_input(
    boxes: list, scores: list, labels: list, masks: Any, message: str
) -> None:
    with pytest.raises(CocoError, match=message):
        detections_to_coco_results(4, boxes, scores, labels, masks, [1, 2])


def test_write_results_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "out" / "results.json"
    results = [{"image_id": 1, "category_id": 2, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.5}]
    assert write_results(results, path) == path
    assert json.loads(path.read_text()) == results
    with pytest.raises(TypeError):
        write_results([{"score": object()}], path)
    assert json.loads(path.read_text()) == results  # the failed write left the old file intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # and no temp file
    plain = tmp_path / "plain.json"
    plain.write_text("[]")
    assert path.stat().st_mode == plain.stat().st_mode  # the umask applies, as for any new file


@needs_coco_tiny
def test_ground_truth_as_detections_scores_perfectly(gt: COCO, perfect: list[dict[str, Any]]) -> None:
    results = perfect
    assert len(results) == sum(1 for a in gt.dataset["annotations"] if not a["iscrowd"])
    metrics = evaluate_detections(ANN_FILE, results)
    for iou_type in ("bbox", "segm"):
        stats = metrics[iou_type]
        assert set(stats) == set(METRIC_NAMES)
        assert stats["AP"] == stats["AP50"] == stats["AP75"] == pytest.approx(1.0, abs=1e-12)
        # coco_tiny has small, medium and large objects, so no area range reports -1.
        assert [stats[k] for k in ("APs", "APm", "APl")] == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)


@needs_coco_tiny
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perturbed_detections_match_cocoeval(
    gt: COCO, perturbed: list[dict[str, Any]], iou_type: str, tmp_path: Path
) -> None:
    expected = _reference_stats(gt, perturbed, iou_type)
    assert 0.3 < expected["AP"] < 0.95, expected  # clearly degraded, clearly not empty
    path = write_results(perturbed, tmp_path / "results.json")
    assert coco_ap(ANN_FILE, path, iou_type) == expected  # read back from the written file


@needs_coco_tiny
def test_img_ids_restricts_scoring(gt: COCO, perfect: list[dict[str, Any]]) -> None:
    subset = sorted(gt.getImgIds())[:10]
    results = [r for r in perfect if r["image_id"] in subset]
    assert coco_ap(ANN_FILE, results, "bbox", img_ids=subset)["AP"] == pytest.approx(1.0, abs=1e-12)
    assert coco_ap(ANN_FILE, results, "bbox")["AP"] < 0.5  # unrun images count as misses


@needs_coco_tiny
def test_empty_results_score_zero() -> None:
    stats = coco_ap(ANN_FILE, [], "segm")
    assert stats == dict.fromkeys(METRIC_NAMES, 0.0)


@needs_coco_tiny
def test_check_images_maps_every_annotated_image(gt: COCO, tmp_path: Path) -> None:
    paths = check_images(ANN_FILE, IMG_DIR)
    assert list(paths) == sorted(gt.getImgIds()) and len(paths) == 80
    assert all(p.is_file() for p in paths.values())
    partial = tmp_path / "val2017"
    partial.mkdir()
    for path in list(paths.values())[:-1]:
        (partial / path.name).symlink_to(path)
    missing_id = list(paths)[-1]
    with pytest.raises(CocoError, match=f"1 annotated image\\(s\\) missing .* id {missing_id}"):
        check_images(ANN_FILE, partial)
    with pytest.raises(CocoError, match="image folder not found"):
        check_images(ANN_FILE, tmp_path / "nowhere")


@needs_coco_tiny
@pytest.mark.parametrize(
    ("result", "iou_type", "message"),
    [
        ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}, "bbox", "image id 1 is not"),
        ({"image_id": None, "category_id": 999, "bbox": [0, 0, 1, 1], "score": 1.0}, "bbox", "category id 999"),
        ({"image_id": None, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}, "segm", "lacks segmentation"),
        ({"image_id": None, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}, "keypoints", "iou_type"),
    ],
)
def test_bad_results_raise_coco_error(gt: COCO, result: dict, iou_type: str, message: str) -> None:
    result = {**result, "image_id": result["image_id"] or sorted(gt.getImgIds())[0]}
    with pytest.raises(CocoError, match=message):
        coco_ap(ANN_FILE, [result], iou_type)  # type: ignore[arg-type]


@needs_coco_tiny
def test_bad_files_raise_coco_error(tmp_path: Path) -> None:
    with pytest.raises(CocoError, match=r"annotation file not found: .*missing\.json"):
        coco_ap(tmp_path / "missing.json", [], "bbox")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(CocoError, match="is not COCO instances JSON"):
        coco_ap(broken, [], "bbox")
    with pytest.raises(CocoError, match="results file not found"):
        coco_ap(ANN_FILE, tmp_path / "no_results.json", "bbox")
    with pytest.raises(CocoError, match="img_ids include 1,"):
        coco_ap(ANN_FILE, [], "bbox", img_ids=[1])
    assert issubclass(CocoError, LrpqError)
