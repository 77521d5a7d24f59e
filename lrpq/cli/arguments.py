"""Argument types and argument groups that several ``lrpq`` commands share, each checked to one clear line."""

from __future__ import annotations

import argparse
import math
import os

import torch

from lrpq.allocation.from_relevance import widths_for
from lrpq.data import draw_calibration_set, load_calibration_images, read_calibration_list
from lrpq.errors import LrpqError
from lrpq.models import ModelSpec

CLI_MIN_BITS, CLI_MAX_BITS = 3, 8


def bits(text: str) -> int | float:
    """A bit width, or a fractional mean-bits target (3.5) that only a budgeted allocator can meet."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not CLI_MIN_BITS <= value <= CLI_MAX_BITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a bit width lrpq accepts: use {CLI_MIN_BITS} to {CLI_MAX_BITS}"
        )
    return int(value) if value.is_integer() else value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def fraction(text: str) -> float:
    """A share of units or weights to remove: 0 ≤ f < 1 (every block keeps at least one unit)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1)")
    return value


def add_widths_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--widths",
        nargs=2,
        type=int,
        metavar=("LO", "HI"),
        help="widths a mixed plan may use (default 3–6, widened to one bit either side of the target)",
    )


def mean_targets(args: argparse.Namespace) -> tuple[int | float, int | float]:
    """--wbits and --abits (which defaults to --wbits) as mean bits; a fractional mean needs --mixed."""
    targets = args.wbits, args.abits if args.abits is not None else args.wbits
    fractional = [value for value in targets if not float(value).is_integer()]
    if fractional and not getattr(args, "mixed", True):
        raise LrpqError(
            f"{fractional[0]} bits is a mean no single width has: pass --mixed to spread it over the layers, "
            "or use whole bits"
        )
    return targets


def mixed_widths(args: argparse.Namespace, wbits: float, abits: float) -> tuple[int, int]:
    """The widths a mixed plan may use: --widths, checked against the targets, or the default range."""
    return widths_for(wbits, abits, tuple(args.widths) if args.widths else None)


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib-data", help="ImageFolder to draw calibration images from (or $LRPQ_CALIB_DATA)")
    parser.add_argument("--calib-list", help="fixed list of calibration images, relative to --calib-data")
    parser.add_argument("--calib-size", type=positive_int, default=32, help="calibration images to draw (default 32)")


def image_folder(args: argparse.Namespace, why: str) -> str:
    """--calib-data, or $LRPQ_CALIB_DATA; ``why`` names what needs the images in the error."""
    folder = args.calib_data or os.environ.get("LRPQ_CALIB_DATA")
    if folder is None:
        raise LrpqError(
            f"{why} needs calibration images: pass --calib-data DIR (an ImageFolder) or set LRPQ_CALIB_DATA"
        )
    return folder


def calibration_images(args: argparse.Namespace, spec: ModelSpec, why: str) -> torch.Tensor:
    """Seeded draw from --calib-data, or a fixed --calib-list (paths relative to --calib-data)."""
    folder = image_folder(args, why)
    if args.calib_list:
        paths = read_calibration_list(args.calib_list, folder)
    else:
        paths = draw_calibration_set(folder, args.calib_size, args.seed)
    return load_calibration_images(paths, spec.data_config)
