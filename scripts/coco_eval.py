"""Quantize an mmdet Swin detector with lrpq and report COCO box and mask AP as JSON.

    python scripts/coco_eval.py --config CFG.py --checkpoint CKPT.pth --data-root data/coco \\
        --wbits 4 --abits 4 --out runs/coco_w4a4.json

Needs mmdet 3.x with a compiled mmcv (see docs/coco.md). Inputs are checked before the detector is
built, so a wrong path fails in a second rather than after model loading. Errors print one line
and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from lrpq_eval.coco import mmdet_adapter as adapter
from lrpq_eval.coco.metric import CocoError, check_images, write_json

from lrpq.config import BitPlan, QuantConfig
from lrpq.errors import LrpqError
from lrpq.relevance import LayerScores


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line and status 2, like every other error of this script."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="mmdet config file")
    parser.add_argument("--checkpoint", type=Path, required=True, help="mmdet checkpoint (.pth)")
    parser.add_argument("--data-root", type=Path, required=True, help="COCO root holding val2017/")
    parser.add_argument(
        "--ann-file", type=Path, help="instances JSON (default: DATA_ROOT/annotations/instances_val2017.json)"
    )
    parser.add_argument("--wbits", type=int, default=4, help="weight bits (the mean under --mixed)")
    parser.add_argument("--abits", type=int, default=4, help="activation bits (the mean under --mixed)")
    parser.add_argument("--float", action="store_true", help="evaluate the float detector (no quantization)")
    parser.add_argument("--mixed", action="store_true", help="mixed precision from --bit-plan or --scores")
    plan = parser.add_mutually_exclusive_group()
    plan.add_argument("--bit-plan", type=Path, help="BitPlan JSON, timm Swin or detector layer names")
    plan.add_argument("--scores", type=Path, help="relevance JSON of the timm Swin backbone, allocated here")
    parser.add_argument("--calib-size", type=int, default=1, help="calibration images (first by image id)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images by id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="metrics JSON; detections go beside it")
    args = parser.parse_args(argv)
    if args.mixed and not (args.bit_plan or args.scores):
        parser.error("--mixed needs --bit-plan FILE or --scores FILE")
    if (args.bit_plan or args.scores) and not args.mixed:
        parser.error("--bit-plan and --scores apply only with --mixed")
    if args.float and args.mixed:
        parser.error("--float and --mixed exclude each other")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit {args.limit} must be at least 1")
    return args


def quant_config(args: argparse.Namespace) -> QuantConfig:
    """Uniform bits, or a per-layer plan for the backbone (neck and heads keep the uniform bits)."""
    config = QuantConfig(wbits=args.wbits, abits=args.abits)
    if not args.mixed:
        return config
    if args.scores:
        plan = adapter.plan_from_scores(LayerScores.load(args.scores), args.wbits, args.abits)
    elif not args.bit_plan.is_file():
        raise CocoError(f"bit plan file not found: {args.bit_plan}")
    else:
        try:
            plan = BitPlan.load(args.bit_plan)
        except (ValueError, TypeError, AttributeError) as exc:
            raise CocoError(f"bit plan {args.bit_plan} is not a BitPlan JSON ({exc})") from None
    return config.with_plan(adapter.detector_plan(plan))


def run(args: argparse.Namespace) -> dict[str, Any]:
    ann_file = args.ann_file or args.data_root / "annotations" / "instances_val2017.json"
    img_dir = args.data_root / "val2017"
    paths = list(check_images(ann_file, img_dir).values())
    config = None if args.float else quant_config(args)
    detector = adapter.build_detector(args.config, args.checkpoint, args.device)
    if config is not None:
        calib = adapter.calibration_images(detector, paths, n=args.calib_size)
        adapter.quantize_detector(detector, config, calib)
    detections = args.out.with_suffix(".detections.json")
    metrics = adapter.run_coco_eval(detector, ann_file, img_dir, detections, limit=args.limit)
    return {
        **metrics,
        "config": str(args.config),
        "checkpoint": str(args.checkpoint),
        "quant": None if config is None else config.to_json_dict(),
        "calib_size": None if config is None else args.calib_size,
        "images": len(paths) if args.limit is None else min(args.limit, len(paths)),
        "detections": str(detections),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except LrpqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json(report, args.out)
    print(json.dumps({key: report[key] for key in ("bbox", "segm") if key in report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
